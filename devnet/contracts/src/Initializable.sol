// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title Initializable (minimal, test-only)
/// @notice Self-contained stand-in for OpenZeppelin v5 `Initializable`, limited to version 1.
///         It emits `Initialized(uint64 version)` with the same signature and at the same point
///         as OZ v5: after the body of the `initializer` function has run. Disabling initializers
///         (done by template constructors) emits `Initialized(type(uint64).max)` as OZ v5 does.
abstract contract Initializable {
    uint64 private _initialized;
    bool private _initializing;

    event Initialized(uint64 version);

    modifier initializer() {
        require(!_initializing && _initialized == 0, "Initializable: contract is already initialized");
        _initialized = 1;
        _initializing = true;
        _;
        _initializing = false;
        emit Initialized(1);
    }

    function _disableInitializers() internal {
        require(!_initializing, "Initializable: contract is initializing");
        if (_initialized != type(uint64).max) {
            _initialized = type(uint64).max;
            emit Initialized(type(uint64).max);
        }
    }

    /// @notice Highest initializer version run so far (type(uint64).max once disabled).
    function initializedVersion() external view returns (uint64) {
        return _initialized;
    }
}
