"""Every KEKTECH event the indexer understands, keyed by (contract kind, topic0).

The declarations are copied verbatim from the deployed contracts (tests/reference_events.py
holds them again, independently, and the tests check this table against it). Several names
exist on more than one contract with different signatures (`MarketResolved`, `MarketApproved`,
`MarketActivated`, `MarketRejected`), so lookups are always by the emitting contract's kind
and topic0, never by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache

from eth_hash.auto import keccak


class ContractKind(StrEnum):
    """What a tracked address is."""

    FACTORY = "factory"
    MARKET = "market"
    RESOLUTION_MANAGER = "resolution_manager"
    REWARD_DISTRIBUTOR = "reward_distributor"


OUTCOME_NAMES = ("UNRESOLVED", "OUTCOME1", "OUTCOME2", "CANCELLED")
STATE_NAMES = ("PROPOSED", "APPROVED", "ACTIVE", "RESOLVING", "DISPUTED", "FINALIZED")

DECLARATIONS: dict[ContractKind, tuple[str, ...]] = {
    ContractKind.FACTORY: (
        "MarketCreated(address indexed marketAddress, address indexed creator, string question, uint256 resolutionTime, uint256 creatorBond, bytes32 indexed category, uint256 timestamp)",  # noqa: E501
        "MarketProposed(address indexed market, address indexed creator, uint256 timestamp, uint256 likesRequired, uint256 approvalDeadline)",  # noqa: E501
        "MarketApproved(address indexed market, address indexed approver, uint256 timestamp, bool isAdminOverride)",  # noqa: E501
        "MarketRejected(address indexed market, address indexed rejector, string reason, uint256 timestamp)",  # noqa: E501
        "MarketActivated(address indexed marketAddress, uint256 timestamp)",
        "MarketDeactivated(address indexed marketAddress, string reason, uint256 timestamp)",
        "CreatorBondRefunded(address indexed marketAddress, address indexed creator, uint256 amount, string reason)",  # noqa: E501
        "FactoryPaused(bool isPaused)",
    ),
    ContractKind.MARKET: (
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
    ContractKind.RESOLUTION_MANAGER: (
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
    ContractKind.REWARD_DISTRIBUTOR: (
        "RewardClaimed(address indexed market, address indexed claimer, uint256 amount, uint8 outcome, uint256 timestamp)",  # noqa: E501
        "FeesCollected(address indexed market, uint256 totalFees, uint256 protocolFees, uint256 creatorFees, uint256 stakerFees, uint256 treasuryFees)",  # noqa: E501
        "CreatorFeesClaimed(address indexed market, address indexed creator, uint256 amount, uint256 timestamp)",  # noqa: E501
        "TreasuryWithdrawal(address indexed recipient, uint256 amount, uint256 timestamp)",
        "StakerRewardsDistributed(address indexed staker, uint256 amount, uint256 timestamp)",
        "FeeDistributionUpdated(uint256 protocolFeeBps, uint256 creatorFeeBps, uint256 stakerIncentiveBps, uint256 treasuryFeeBps)",  # noqa: E501
    ),
}


@dataclass(frozen=True, slots=True)
class Param:
    """One event parameter."""

    name: str
    type: str
    indexed: bool

    @property
    def enum_names(self) -> tuple[str, ...] | None:
        """Names of the enum values when this uint8 is an enum (every uint8 here is one)."""
        if self.type != "uint8":
            return None
        return STATE_NAMES if self.name == "newState" else OUTCOME_NAMES


@dataclass(frozen=True, slots=True)
class EventSpec:
    """A parsed event declaration, with what decoding needs computed once."""

    kind: ContractKind
    name: str
    params: tuple[Param, ...]
    signature: str = field(init=False)
    topic0: str = field(init=False)
    indexed: tuple[Param, ...] = field(init=False)
    non_indexed: tuple[Param, ...] = field(init=False)
    data_types: tuple[str, ...] = field(init=False)
    # The whole declaration (kind, names, indexed flags): identifies the layout for caches.
    key: str = field(init=False)

    def __post_init__(self) -> None:
        # Derived here rather than in properties: they are read for every log decoded.
        signature = f"{self.name}({','.join(p.type for p in self.params)})"
        plain = tuple(p for p in self.params if not p.indexed)
        object.__setattr__(self, "signature", signature)
        object.__setattr__(self, "topic0", "0x" + keccak(signature.encode()).hex())
        object.__setattr__(self, "indexed", tuple(p for p in self.params if p.indexed))
        object.__setattr__(self, "non_indexed", plain)
        object.__setattr__(self, "data_types", tuple(p.type for p in plain))
        declared = ", ".join(
            f"{p.type}{' indexed' if p.indexed else ''} {p.name}" for p in self.params
        )
        object.__setattr__(self, "key", f"{self.kind}:{self.name}({declared})")


def parse_declaration(kind: ContractKind, declaration: str) -> EventSpec:
    """Parse `Name(type [indexed] name, ...)` into an EventSpec."""
    name, _, rest = declaration.partition("(")
    if not rest.endswith(")") or not name.isidentifier():
        raise ValueError(f"malformed event declaration: {declaration!r}")
    params = []
    for chunk in filter(None, (c.strip() for c in rest[:-1].split(","))):
        words = chunk.split()
        if len(words) == 3 and words[1] == "indexed":
            params.append(Param(name=words[2], type=words[0], indexed=True))
        elif len(words) == 2 and words[1] != "indexed":
            params.append(Param(name=words[1], type=words[0], indexed=False))
        else:
            raise ValueError(f"malformed parameter {chunk!r} in {declaration!r}")
    return EventSpec(kind=kind, name=name, params=tuple(params))


@cache
def catalog() -> dict[tuple[ContractKind, str], EventSpec]:
    """All known events keyed by (contract kind, topic0)."""
    specs: dict[tuple[ContractKind, str], EventSpec] = {}
    for kind, declarations in DECLARATIONS.items():
        for declaration in declarations:
            spec = parse_declaration(kind, declaration)
            specs[(kind, spec.topic0)] = spec
    return specs


MARKET_CREATED = parse_declaration(ContractKind.FACTORY, DECLARATIONS[ContractKind.FACTORY][0])
