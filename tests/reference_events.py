"""The deployed KEKTECH events, copied verbatim from the team's on-chain reference.

Kept as test data, independent of the indexer's own catalogue, so tests can check both the
test contracts and the indexer against the same source of truth. `Outcome` and
`MarketState` are `uint8` in the ABI.
"""

REFERENCE_EVENTS: dict[str, tuple[str, ...]] = {
    "factory": (
        "MarketCreated(address indexed marketAddress, address indexed creator, string question, uint256 resolutionTime, uint256 creatorBond, bytes32 indexed category, uint256 timestamp)",  # noqa: E501
        "MarketProposed(address indexed market, address indexed creator, uint256 timestamp, uint256 likesRequired, uint256 approvalDeadline)",  # noqa: E501
        "MarketApproved(address indexed market, address indexed approver, uint256 timestamp, bool isAdminOverride)",  # noqa: E501
        "MarketRejected(address indexed market, address indexed rejector, string reason, uint256 timestamp)",  # noqa: E501
        "MarketActivated(address indexed marketAddress, uint256 timestamp)",
        "MarketDeactivated(address indexed marketAddress, string reason, uint256 timestamp)",
        "CreatorBondRefunded(address indexed marketAddress, address indexed creator, uint256 amount, string reason)",  # noqa: E501
        "FactoryPaused(bool isPaused)",
    ),
    "market": (
        "BetPlaced(address indexed bettor, uint8 indexed outcome, uint256 amount, uint256 shares, uint256 timestamp)",  # noqa: E501
        "MarketResolved(uint8 indexed result, address indexed resolver, uint256 timestamp)",
        "WinningsClaimed(address indexed bettor, uint256 amount, uint256 timestamp)",
        "LiquidityUpdated(uint256 pool1, uint256 pool2, uint256 timestamp)",
        "SharesUpdated(uint256 yesShares, uint256 noShares, uint256 timestamp)",
        "MarketStateChanged(uint8 indexed newState, uint256 timestamp)",
        "MarketApproved(uint256 timestamp)",
        "MarketActivated(uint256 timestamp)",
        "MarketRejected(string reason)",
        "ResolutionProposed(uint8 indexed outcome, address indexed proposer)",
        "MarketDisputed(address indexed disputer, string reason)",
        "MarketFinalized(uint8 indexed finalOutcome, uint256 timestamp)",
        "Initialized(uint64 version)",
    ),
    "resolution_manager": (
        "MarketResolved(address indexed marketAddress, uint8 indexed outcome, address indexed resolver, uint256 timestamp)",  # noqa: E501
        "ResolutionDisputed(address indexed marketAddress, address indexed disputer, string reason, uint256 bondAmount, uint256 timestamp)",  # noqa: E501
        "DisputeInvestigated(address indexed marketAddress, address indexed investigator, string findings, uint256 timestamp)",  # noqa: E501
        "DisputeResolved(address indexed marketAddress, bool upheld, uint8 newOutcome, uint256 timestamp)",  # noqa: E501
        "ResolutionFinalized(address indexed marketAddress, uint8 finalOutcome, uint256 timestamp)",
        "DisputeBondCollected(address indexed market, uint256 amount, uint256 timestamp)",
        "DisputeBondTransferFailed(address indexed market, uint256 amount)",
        "CommunityDisputeWindowOpened(address indexed market, uint8 outcome, uint256 endTime)",
        "DisputeSignalsSubmitted(address indexed market, uint256 agreeCount, uint256 disagreeCount)",  # noqa: E501
        "MarketAutoFinalized(address indexed market, uint8 outcome)",
        "CommunityDisputeFlagged(address indexed market, uint256 disagreementPercent)",
        "AdminResolution(address indexed market, uint8 outcome, string reason)",
    ),
    "reward_distributor": (
        "RewardClaimed(address indexed market, address indexed claimer, uint256 amount, uint8 outcome, uint256 timestamp)",  # noqa: E501
        "FeesCollected(address indexed market, uint256 totalFees, uint256 protocolFees, uint256 creatorFees, uint256 stakerFees, uint256 treasuryFees)",  # noqa: E501
        "CreatorFeesClaimed(address indexed market, address indexed creator, uint256 amount, uint256 timestamp)",  # noqa: E501
        "TreasuryWithdrawal(address indexed recipient, uint256 amount, uint256 timestamp)",
        "StakerRewardsDistributed(address indexed staker, uint256 amount, uint256 timestamp)",
        "FeeDistributionUpdated(uint256 protocolFeeBps, uint256 creatorFeeBps, uint256 stakerIncentiveBps, uint256 treasuryFeeBps)",  # noqa: E501
    ),
}


def canonical(declaration: str) -> str:
    """`Name(type a, type indexed b)` -> `Name(type,type)`, the string keccak'd into topic0."""
    name, _, params = declaration.partition("(")
    types = [p.split()[0] for p in params.rstrip(")").split(",") if p.strip()]
    return f"{name}({','.join(types)})"


def indexed_count(declaration: str) -> int:
    """How many parameters of a declaration are indexed (topics after topic0)."""
    return declaration.count(" indexed ")
