// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @notice Calls the factory and the resolution manager make on a PredictionMarket clone.
interface IPredictionMarket {
    function initialize(
        address factory,
        address creator,
        string calldata question,
        uint256 resolutionTime,
        uint256 creatorBond,
        bytes32 category,
        address resolutionManager,
        address rewardDistributor
    ) external;

    function approve() external;

    function activate() external;

    function reject(string calldata reason) external;

    function proposeResolution(uint8 outcome, address proposer) external;

    function resolve(uint8 result, address resolver) external;

    function dispute(address disputer, string calldata reason) external;

    function finalize(uint8 finalOutcome) external;

    function cancel(address resolver) external;

    function creator() external view returns (address);
}
