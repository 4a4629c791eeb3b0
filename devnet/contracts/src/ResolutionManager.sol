// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

import {IPredictionMarket} from "./IPredictionMarket.sol";

/// @title ResolutionManager (test)
/// @notice Emits the events of the deployed KEKTECH ResolutionManager and drives markets through
///         resolution. Access control is permissive: anyone may call every function. Dispute bonds
///         (the value sent to disputeResolution) are held here per market.
contract ResolutionManager {
    event MarketResolved(address indexed marketAddress, uint8 indexed outcome, address indexed resolver, uint256 timestamp);
    event ResolutionDisputed(
        address indexed marketAddress,
        address indexed disputer,
        string reason,
        uint256 bondAmount,
        uint256 timestamp
    );
    event DisputeInvestigated(address indexed marketAddress, address indexed investigator, string findings, uint256 timestamp);
    event DisputeResolved(address indexed marketAddress, bool upheld, uint8 newOutcome, uint256 timestamp);
    event ResolutionFinalized(address indexed marketAddress, uint8 finalOutcome, uint256 timestamp);
    event DisputeBondCollected(address indexed market, uint256 amount, uint256 timestamp);
    event DisputeBondTransferFailed(address indexed market, uint256 amount);
    event CommunityDisputeWindowOpened(address indexed market, uint8 outcome, uint256 endTime);
    event DisputeSignalsSubmitted(address indexed market, uint256 agreeCount, uint256 disagreeCount);
    event MarketAutoFinalized(address indexed market, uint8 outcome);
    event CommunityDisputeFlagged(address indexed market, uint256 disagreementPercent);
    event AdminResolution(address indexed market, uint8 outcome, string reason);

    uint256 public constant DISPUTE_WINDOW = 1 days;
    uint256 public constant COMMUNITY_DISPUTE_THRESHOLD_PERCENT = 40;

    /// @notice Dispute bonds currently held per market (wei).
    mapping(address => uint256) public disputeBonds;

    constructor() {}

    receive() external payable {}

    function proposeResolution(address market, uint8 outcome) external {
        IPredictionMarket(market).proposeResolution(outcome, msg.sender);
    }

    function resolveMarket(address market, uint8 outcome) external {
        IPredictionMarket(market).resolve(outcome, msg.sender);
        emit MarketResolved(market, outcome, msg.sender, block.timestamp);
        emit CommunityDisputeWindowOpened(market, outcome, block.timestamp + DISPUTE_WINDOW);
    }

    /// @notice Cancels `market` (the deployed market's own cancelMarket(), which an admin or
    ///         resolver calls there): the market emits MarketResolved(CANCELLED); nothing here.
    function cancelMarket(address market) external {
        IPredictionMarket(market).cancel(msg.sender);
    }

    function disputeResolution(address market, string calldata reason) external payable {
        emit ResolutionDisputed(market, msg.sender, reason, msg.value, block.timestamp);
        IPredictionMarket(market).dispute(msg.sender, reason);
        if (msg.value > 0) {
            disputeBonds[market] += msg.value;
            emit DisputeBondCollected(market, msg.value, block.timestamp);
        }
    }

    function investigateDispute(address market, string calldata findings) external {
        emit DisputeInvestigated(market, msg.sender, findings, block.timestamp);
    }

    function resolveDispute(address market, bool upheld, uint8 newOutcome) external {
        _requireOutcome(newOutcome);
        emit DisputeResolved(market, upheld, newOutcome, block.timestamp);
    }

    function finalizeResolution(address market, uint8 finalOutcome) external {
        IPredictionMarket(market).finalize(finalOutcome);
        emit ResolutionFinalized(market, finalOutcome, block.timestamp);
    }

    function submitDisputeSignals(address market, uint256 agreeCount, uint256 disagreeCount) external {
        emit DisputeSignalsSubmitted(market, agreeCount, disagreeCount);
        uint256 total = agreeCount + disagreeCount;
        if (total > 0) {
            uint256 disagreementPercent = (disagreeCount * 100) / total;
            if (disagreementPercent >= COMMUNITY_DISPUTE_THRESHOLD_PERCENT) {
                emit CommunityDisputeFlagged(market, disagreementPercent);
            }
        }
    }

    function autoFinalize(address market, uint8 outcome) external {
        IPredictionMarket(market).finalize(outcome);
        emit MarketAutoFinalized(market, outcome);
    }

    /// @notice Like the deployed adminResolve(): finalizes the market with `outcome` (as
    ///         finalizeResolution does; the market refuses it unless ACTIVE, RESOLVING or
    ///         DISPUTED, and an outcome but 1..3), then announces it.
    function adminResolve(address market, uint8 outcome, string calldata reason) external {
        IPredictionMarket(market).finalize(outcome);
        emit AdminResolution(market, outcome, reason);
    }

    /// @notice Tries to send the bond held for `market` to `to`. On success the bond is cleared
    ///         (no event); on failure it is kept and DisputeBondTransferFailed is emitted. Never
    ///         reverts because of the transfer (a zero bond is attempted like any other).
    function returnDisputeBond(address market, address to) external {
        uint256 amount = disputeBonds[market];
        disputeBonds[market] = 0;
        (bool ok, ) = payable(to).call{value: amount}("");
        if (!ok) {
            disputeBonds[market] = amount;
            emit DisputeBondTransferFailed(market, amount);
        }
    }

    function _requireOutcome(uint8 value) private pure {
        require(value <= 3, "ResolutionManager: outcome must be 0..3");
    }
}
