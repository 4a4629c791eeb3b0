// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

import {IPredictionMarket} from "./IPredictionMarket.sol";

/// @title FlexibleMarketFactoryUnified (test factory)
/// @notice Emits the events of the deployed KEKTECH factory. Each market is an EIP-1167 minimal
///         proxy of `template`, created with plain CREATE. Access control is permissive: anyone may
///         call every function. Creator bonds (the value sent to createMarket) are held here and
///         can be refunded once. Deliberately has NO receive/fallback: plain ETH sends to it fail.
contract FlexibleMarketFactoryUnified {
    event MarketCreated(
        address indexed marketAddress,
        address indexed creator,
        string question,
        uint256 resolutionTime,
        uint256 creatorBond,
        bytes32 indexed category,
        uint256 timestamp
    );
    event MarketProposed(
        address indexed market,
        address indexed creator,
        uint256 timestamp,
        uint256 likesRequired,
        uint256 approvalDeadline
    );
    event MarketApproved(address indexed market, address indexed approver, uint256 timestamp, bool isAdminOverride);
    event MarketRejected(address indexed market, address indexed rejector, string reason, uint256 timestamp);
    event MarketActivated(address indexed marketAddress, uint256 timestamp);
    event MarketDeactivated(address indexed marketAddress, string reason, uint256 timestamp);
    event CreatorBondRefunded(address indexed marketAddress, address indexed creator, uint256 amount, string reason);
    event FactoryPaused(bool isPaused);

    address public immutable template;
    address public immutable resolutionManager;
    address public immutable rewardDistributor;

    bool public paused;
    address[] public markets;
    mapping(address => bool) public isMarket;
    mapping(address => address) public marketCreator;
    mapping(address => uint256) public creatorBonds;
    mapping(address => bool) public bondRefunded;
    mapping(address => bool) public isDeactivated;

    modifier onlyMarket(address market) {
        require(isMarket[market], "Factory: unknown market");
        _;
    }

    constructor(address template_, address resolutionManager_, address rewardDistributor_) {
        require(template_.code.length > 0, "Factory: template is not a contract");
        require(resolutionManager_ != address(0), "Factory: zero resolution manager");
        template = template_;
        resolutionManager = resolutionManager_;
        rewardDistributor = rewardDistributor_;
    }

    function createMarket(
        string calldata question,
        uint256 resolutionTime,
        bytes32 category,
        uint256 likesRequired,
        uint256 approvalDeadline
    ) external payable returns (address market) {
        require(!paused, "Factory: paused");
        market = _clone(template);
        IPredictionMarket(market).initialize(
            address(this),
            msg.sender,
            question,
            resolutionTime,
            msg.value,
            category,
            resolutionManager,
            rewardDistributor
        );
        markets.push(market);
        isMarket[market] = true;
        marketCreator[market] = msg.sender;
        creatorBonds[market] = msg.value;

        emit MarketProposed(market, msg.sender, block.timestamp, likesRequired, approvalDeadline);
        emit MarketCreated(market, msg.sender, question, resolutionTime, msg.value, category, block.timestamp);
    }

    function approveMarket(address market, bool isAdminOverride) external onlyMarket(market) {
        IPredictionMarket(market).approve();
        emit MarketApproved(market, msg.sender, block.timestamp, isAdminOverride);
    }

    function rejectMarket(address market, string calldata reason) external onlyMarket(market) {
        IPredictionMarket(market).reject(reason);
        emit MarketRejected(market, msg.sender, reason, block.timestamp);
    }

    function activateMarket(address market) external onlyMarket(market) {
        IPredictionMarket(market).activate();
        emit MarketActivated(market, block.timestamp);
    }

    /// @notice Flags the market deactivated (repeat calls are allowed and emit again).
    function deactivateMarket(address market, string calldata reason) external onlyMarket(market) {
        isDeactivated[market] = true;
        emit MarketDeactivated(market, reason, block.timestamp);
    }

    /// @notice Sends the bond recorded at creation back to the market's creator (once).
    function refundCreatorBond(address market, string calldata reason) external onlyMarket(market) {
        require(!bondRefunded[market], "Factory: creator bond already refunded");
        bondRefunded[market] = true;
        address creator = marketCreator[market];
        uint256 amount = creatorBonds[market];
        creatorBonds[market] = 0;
        if (amount > 0) {
            (bool ok, ) = payable(creator).call{value: amount}("");
            require(ok, "Factory: bond refund transfer failed");
        }
        emit CreatorBondRefunded(market, creator, amount, reason);
    }

    function setPaused(bool isPaused) external {
        paused = isPaused;
        emit FactoryPaused(isPaused);
    }

    function marketCount() external view returns (uint256) {
        return markets.length;
    }

    /// @dev EIP-1167 minimal proxy via CREATE: 10-byte init code + 45-byte runtime
    ///      363d3d373d3d3d363d73<impl>5af43d82803e903d91602b57fd5bf3.
    function _clone(address implementation) private returns (address instance) {
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, 0x3d602d80600a3d3981f3363d3d373d3d3d363d73000000000000000000000000)
            mstore(add(ptr, 0x14), shl(0x60, implementation))
            mstore(add(ptr, 0x28), 0x5af43d82803e903d91602b57fd5bf30000000000000000000000000000000000)
            instance := create(0, ptr, 0x37)
        }
        require(instance != address(0), "Factory: clone creation failed");
    }
}
