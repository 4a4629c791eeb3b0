// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title RewardDistributor (test, accounting only)
/// @notice Emits the events of the deployed KEKTECH RewardDistributor. Holds and moves no ETH:
///         every amount is bookkeeping. Access control is permissive: anyone may call.
contract RewardDistributor {
    event RewardClaimed(address indexed market, address indexed claimer, uint256 amount, uint8 outcome, uint256 timestamp);
    event FeesCollected(
        address indexed market,
        uint256 totalFees,
        uint256 protocolFees,
        uint256 creatorFees,
        uint256 stakerFees,
        uint256 treasuryFees
    );
    event CreatorFeesClaimed(address indexed market, address indexed creator, uint256 amount, uint256 timestamp);
    event TreasuryWithdrawal(address indexed recipient, uint256 amount, uint256 timestamp);
    event StakerRewardsDistributed(address indexed staker, uint256 amount, uint256 timestamp);
    event FeeDistributionUpdated(
        uint256 protocolFeeBps,
        uint256 creatorFeeBps,
        uint256 stakerIncentiveBps,
        uint256 treasuryFeeBps
    );

    uint256 public constant BPS_DENOMINATOR = 10000;

    uint256 public protocolFeeBps = 1000;
    uint256 public creatorFeeBps = 500;
    uint256 public stakerIncentiveBps = 300;
    uint256 public treasuryFeeBps = 200;

    /// @notice Creator fees accrued per market and not yet claimed.
    mapping(address => uint256) public creatorFeesAccrued;
    uint256 public totalProtocolFees;
    uint256 public totalStakerFees;
    uint256 public totalTreasuryFees;

    constructor() {}

    function setFeeDistribution(
        uint256 protocolFeeBps_,
        uint256 creatorFeeBps_,
        uint256 stakerIncentiveBps_,
        uint256 treasuryFeeBps_
    ) external {
        require(
            protocolFeeBps_ + creatorFeeBps_ + stakerIncentiveBps_ + treasuryFeeBps_ <= BPS_DENOMINATOR,
            "RewardDistributor: fee bps sum exceeds 10000"
        );
        protocolFeeBps = protocolFeeBps_;
        creatorFeeBps = creatorFeeBps_;
        stakerIncentiveBps = stakerIncentiveBps_;
        treasuryFeeBps = treasuryFeeBps_;
        emit FeeDistributionUpdated(protocolFeeBps_, creatorFeeBps_, stakerIncentiveBps_, treasuryFeeBps_);
    }

    /// @notice Splits `totalFees` by the current bps: part = totalFees * bps / 10000 (rounded down).
    function collectFees(address market, uint256 totalFees) external {
        uint256 protocolFees = (totalFees * protocolFeeBps) / BPS_DENOMINATOR;
        uint256 creatorFees = (totalFees * creatorFeeBps) / BPS_DENOMINATOR;
        uint256 stakerFees = (totalFees * stakerIncentiveBps) / BPS_DENOMINATOR;
        uint256 treasuryFees = (totalFees * treasuryFeeBps) / BPS_DENOMINATOR;
        creatorFeesAccrued[market] += creatorFees;
        totalProtocolFees += protocolFees;
        totalStakerFees += stakerFees;
        totalTreasuryFees += treasuryFees;
        emit FeesCollected(market, totalFees, protocolFees, creatorFees, stakerFees, treasuryFees);
    }

    /// @notice Emits the accrued creator fees of `market` (may be 0) and zeroes the accrual.
    function claimCreatorFees(address market) external {
        uint256 amount = creatorFeesAccrued[market];
        creatorFeesAccrued[market] = 0;
        emit CreatorFeesClaimed(market, msg.sender, amount, block.timestamp);
    }

    function claimReward(address market, uint8 outcome, uint256 amount) external {
        require(outcome <= 3, "RewardDistributor: outcome must be 0..3");
        emit RewardClaimed(market, msg.sender, amount, outcome, block.timestamp);
    }

    function withdrawTreasury(address recipient, uint256 amount) external {
        require(recipient != address(0), "RewardDistributor: zero recipient");
        emit TreasuryWithdrawal(recipient, amount, block.timestamp);
    }

    function distributeStakerRewards(address staker, uint256 amount) external {
        require(staker != address(0), "RewardDistributor: zero staker");
        emit StakerRewardsDistributed(staker, amount, block.timestamp);
    }
}
