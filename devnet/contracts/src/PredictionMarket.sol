// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

import {Initializable} from "./Initializable.sol";

/// @title PredictionMarket (test template)
/// @notice Emits the events of the deployed KEKTECH PredictionMarket. The factory deploys it once
///         as a template and makes each market an EIP-1167 clone of it. `legacy` is an immutable,
///         so it lives in the template's code and every clone inherits it: a legacy market emits
///         no `MarketStateChanged` at all (like early template-v1 markets).
///         Access control is test-grade: "factory" and "resolution manager" are the addresses
///         passed to `initialize`; betting and claiming are open to anyone.
contract PredictionMarket is Initializable {
    // Outcome (uint8 in every event): 0 UNRESOLVED, 1 OUTCOME1, 2 OUTCOME2, 3 CANCELLED.
    enum Outcome {
        UNRESOLVED,
        OUTCOME1,
        OUTCOME2,
        CANCELLED
    }

    // MarketState (uint8 in every event).
    enum MarketState {
        PROPOSED,
        APPROVED,
        ACTIVE,
        RESOLVING,
        DISPUTED,
        FINALIZED
    }

    event BetPlaced(address indexed bettor, uint8 indexed outcome, uint256 amount, uint256 shares, uint256 timestamp);
    event MarketResolved(uint8 indexed result, address indexed resolver, uint256 timestamp);
    event WinningsClaimed(address indexed bettor, uint256 amount, uint256 timestamp);
    event LiquidityUpdated(uint256 pool1, uint256 pool2, uint256 timestamp);
    event SharesUpdated(uint256 yesShares, uint256 noShares, uint256 timestamp);
    event MarketStateChanged(uint8 indexed newState, uint256 timestamp);
    event MarketApproved(uint256 timestamp);
    event MarketActivated(uint256 timestamp);
    event MarketRejected(string reason);
    event ResolutionProposed(uint8 indexed outcome, address indexed proposer);
    event MarketDisputed(address indexed disputer, string reason);
    event MarketFinalized(uint8 indexed finalOutcome, uint256 timestamp);

    /// @notice True for a template modelling early markets that emit no MarketStateChanged.
    bool public immutable legacy;

    address public factory;
    address public creator;
    string public question;
    uint256 public resolutionTime;
    uint256 public creatorBond;
    bytes32 public category;
    address public resolutionManager;
    address public rewardDistributor;

    MarketState private _state;
    Outcome private _outcome;
    Outcome private _proposedOutcome;
    bool public rejected;
    /// @notice True once cancelled (see `cancel`).
    bool public cancelled;

    /// @notice Total stake on OUTCOME1 / OUTCOME2 (wei).
    uint256 public pool1;
    uint256 public pool2;
    /// @notice Total shares on OUTCOME1 ("yes") / OUTCOME2 ("no"). One share per wei.
    uint256 public yesShares;
    uint256 public noShares;

    mapping(address => mapping(uint8 => uint256)) private _stakes;
    mapping(address => bool) public hasClaimed;

    modifier onlyFactory() {
        require(msg.sender == factory, "PredictionMarket: caller is not the factory");
        _;
    }

    modifier onlyResolutionManager() {
        require(msg.sender == resolutionManager, "PredictionMarket: caller is not the resolution manager");
        _;
    }

    modifier notCancelled() {
        require(!cancelled, "PredictionMarket: market was cancelled");
        _;
    }

    constructor(bool legacy_) {
        legacy = legacy_;
        _disableInitializers();
    }

    function initialize(
        address factory_,
        address creator_,
        string calldata question_,
        uint256 resolutionTime_,
        uint256 creatorBond_,
        bytes32 category_,
        address resolutionManager_,
        address rewardDistributor_
    ) external initializer {
        require(factory_ != address(0), "PredictionMarket: zero factory");
        require(creator_ != address(0), "PredictionMarket: zero creator");
        require(resolutionManager_ != address(0), "PredictionMarket: zero resolution manager");
        factory = factory_;
        creator = creator_;
        question = question_;
        resolutionTime = resolutionTime_;
        creatorBond = creatorBond_;
        category = category_;
        resolutionManager = resolutionManager_;
        rewardDistributor = rewardDistributor_;
        _setState(MarketState.PROPOSED);
    }

    // ---------------------------------------------------------------- lifecycle (factory)

    function approve() external onlyFactory notCancelled {
        require(!rejected, "PredictionMarket: market was rejected");
        require(_state == MarketState.PROPOSED, "PredictionMarket: market is not PROPOSED");
        emit MarketApproved(block.timestamp);
        _setState(MarketState.APPROVED);
    }

    function activate() external onlyFactory notCancelled {
        require(!rejected, "PredictionMarket: market was rejected");
        require(_state == MarketState.APPROVED, "PredictionMarket: market is not APPROVED");
        emit MarketActivated(block.timestamp);
        _setState(MarketState.ACTIVE);
    }

    /// @notice Marks the market rejected (state is left as is; no MarketStateChanged).
    function reject(string calldata reason) external onlyFactory notCancelled {
        require(!rejected, "PredictionMarket: market already rejected");
        require(
            _state == MarketState.PROPOSED || _state == MarketState.APPROVED,
            "PredictionMarket: only PROPOSED or APPROVED markets can be rejected"
        );
        rejected = true;
        emit MarketRejected(reason);
    }

    // ---------------------------------------------------------------- betting

    function placeBet(uint8 outcome_) external payable notCancelled {
        require(
            outcome_ == uint8(Outcome.OUTCOME1) || outcome_ == uint8(Outcome.OUTCOME2),
            "PredictionMarket: outcome must be 1 or 2"
        );
        require(msg.value > 0, "PredictionMarket: bet amount must be > 0");
        require(_state == MarketState.ACTIVE, "PredictionMarket: market is not ACTIVE");

        uint256 shares = msg.value;
        if (outcome_ == uint8(Outcome.OUTCOME1)) {
            pool1 += msg.value;
            yesShares += shares;
        } else {
            pool2 += msg.value;
            noShares += shares;
        }
        _stakes[msg.sender][outcome_] += msg.value;

        emit BetPlaced(msg.sender, outcome_, msg.value, shares, block.timestamp);
        emit SharesUpdated(yesShares, noShares, block.timestamp);
        emit LiquidityUpdated(pool1, pool2, block.timestamp);
    }

    // ---------------------------------------------------------------- resolution (resolution manager)

    function proposeResolution(uint8 outcome_, address proposer) external onlyResolutionManager notCancelled {
        _requireResolvedOutcome(outcome_);
        require(_state == MarketState.ACTIVE, "PredictionMarket: market is not ACTIVE");
        _proposedOutcome = Outcome(outcome_);
        emit ResolutionProposed(outcome_, proposer);
        _setState(MarketState.RESOLVING);
    }

    /// @notice Like the deployed resolveMarket(), only to OUTCOME1 or OUTCOME2: a MarketResolved of
    ///         CANCELLED comes from `cancel` alone, and moves the market nowhere.
    function resolve(uint8 result, address resolver) external onlyResolutionManager notCancelled {
        require(
            result == uint8(Outcome.OUTCOME1) || result == uint8(Outcome.OUTCOME2),
            "PredictionMarket: outcome must be 1 or 2"
        );
        require(
            _state == MarketState.ACTIVE || _state == MarketState.RESOLVING || _state == MarketState.DISPUTED,
            "PredictionMarket: market cannot be resolved in its current state"
        );
        _outcome = Outcome(result);
        emit MarketResolved(result, resolver, block.timestamp);
        if (_state != MarketState.RESOLVING) {
            _setState(MarketState.RESOLVING);
        }
    }

    function dispute(address disputer, string calldata reason) external onlyResolutionManager notCancelled {
        require(_state == MarketState.RESOLVING, "PredictionMarket: market is not RESOLVING");
        emit MarketDisputed(disputer, reason);
        _setState(MarketState.DISPUTED);
    }

    function finalize(uint8 finalOutcome) external onlyResolutionManager notCancelled {
        _requireResolvedOutcome(finalOutcome);
        require(
            _state == MarketState.ACTIVE || _state == MarketState.RESOLVING || _state == MarketState.DISPUTED,
            "PredictionMarket: market cannot be finalized in its current state"
        );
        _outcome = Outcome(finalOutcome);
        emit MarketFinalized(finalOutcome, block.timestamp);
        _setState(MarketState.FINALIZED);
    }

    /// @notice The deployed cancelMarket(): in any state, a rejected market included, while no
    ///         outcome is set. Sets the outcome to CANCELLED and emits MarketResolved(CANCELLED)
    ///         alone: the state is left as is (no MarketStateChanged). The market then takes no
    ///         more lifecycle call or bet; every bettor may claim their stake back.
    function cancel(address resolver) external onlyResolutionManager {
        require(_outcome == Outcome.UNRESOLVED, "PredictionMarket: market already resolved");
        cancelled = true;
        _outcome = Outcome.CANCELLED;
        emit MarketResolved(uint8(Outcome.CANCELLED), resolver, block.timestamp);
    }

    // ---------------------------------------------------------------- claims

    /// @notice After FINALIZED: a bettor on the final outcome gets stake * totalPool / winningPool;
    ///         if CANCELLED every bettor gets their total stake back. Capped to the balance.
    ///         After a cancellation (in any state): every bettor gets their total stake back.
    function claimWinnings() external {
        require(
            _state == MarketState.FINALIZED || cancelled,
            "PredictionMarket: market is not FINALIZED or cancelled"
        );
        require(!hasClaimed[msg.sender], "PredictionMarket: winnings already claimed");
        uint256 amount = claimableAmount(msg.sender);
        require(amount > 0, "PredictionMarket: nothing to claim");
        hasClaimed[msg.sender] = true;
        if (amount > address(this).balance) {
            amount = address(this).balance;
        }
        if (amount > 0) {
            (bool ok, ) = payable(msg.sender).call{value: amount}("");
            require(ok, "PredictionMarket: payout transfer failed");
        }
        emit WinningsClaimed(msg.sender, amount, block.timestamp);
    }

    // ---------------------------------------------------------------- views

    function state() external view returns (uint8) {
        return uint8(_state);
    }

    function outcome() external view returns (uint8) {
        return uint8(_outcome);
    }

    function proposedOutcome() external view returns (uint8) {
        return uint8(_proposedOutcome);
    }

    function totalPool() public view returns (uint256) {
        return pool1 + pool2;
    }

    function stakeOf(address bettor, uint8 outcome_) external view returns (uint256) {
        return _stakes[bettor][outcome_];
    }

    /// @notice Amount `bettor` would be owed now (before capping to the balance); 0 if neither
    ///         FINALIZED nor cancelled.
    function claimableAmount(address bettor) public view returns (uint256) {
        if ((_state != MarketState.FINALIZED && !cancelled) || hasClaimed[bettor]) {
            return 0;
        }
        if (_outcome == Outcome.CANCELLED) {
            return _stakes[bettor][uint8(Outcome.OUTCOME1)] + _stakes[bettor][uint8(Outcome.OUTCOME2)];
        }
        uint256 stake = _stakes[bettor][uint8(_outcome)];
        if (stake == 0) {
            return 0;
        }
        uint256 winningPool = _outcome == Outcome.OUTCOME1 ? pool1 : pool2;
        return (stake * totalPool()) / winningPool;
    }

    // ---------------------------------------------------------------- internals

    function _setState(MarketState newState) private {
        _state = newState;
        if (!legacy) {
            emit MarketStateChanged(uint8(newState), block.timestamp);
        }
    }

    function _requireResolvedOutcome(uint8 value) private pure {
        require(
            value >= uint8(Outcome.OUTCOME1) && value <= uint8(Outcome.CANCELLED),
            "PredictionMarket: outcome must be 1, 2 or 3"
        );
    }
}
