"""Tests of the shared settings classes: parsing, validation messages, secrecy, .env loading."""

from __future__ import annotations

import shutil
from ipaddress import ip_network
from pathlib import Path

import pytest
from pydantic import SecretStr

from ops.settings import OpsSettings
from shared.broadcaster_settings import BroadcasterSettings
from shared.errors import ConfigError
from shared.indexer_settings import IndexerSettings
from shared.settings import ServiceSettings
from shared.settings_loading import load_settings, settings_or_exit

REPO_ROOT = Path(__file__).resolve().parents[2]
FACTORY_V1 = "0x3eaF643482Fe35d13DB812946E14F5345eb60d62"
FACTORY_V2 = "0x169b4019Fc12c5bD43BFA5d830Fd01A678df6a15"
ALL_VARIABLES = sorted(
    {
        name.upper()
        for cls in (IndexerSettings, BroadcasterSettings, OpsSettings)
        for name in cls.model_fields
    }
)

# Every setting that is a number of seconds, days, percent or a rate, with the first class
# that reads it.
FLOAT_VARIABLES = list(
    {
        name.upper(): cls
        for cls in (OpsSettings, BroadcasterSettings, IndexerSettings)
        for name, field in cls.model_fields.items()
        if field.annotation is float
    }.items()
)
DAY = 86_400


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run each test in an empty directory with none of our variables set."""
    for name in ALL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_error(cls: type[ServiceSettings], **env: str) -> ConfigError:
    """Load cls with env set for the duration of the call and return the ConfigError raised."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigError) as caught:
            load_settings(cls)
    return caught.value


def test_indexer_defaults() -> None:
    """With nothing set, the indexer gets the documented defaults."""
    settings = load_settings(IndexerSettings)
    assert settings.chain_id == 32323
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert settings.database_url.get_secret_value() == (
        "postgresql://kektech@127.0.0.1:5432/kektech"
    )
    assert settings.rpc_urls() == ["http://127.0.0.1:8545"]
    assert settings.market_factory_address == ()
    assert settings.resolution_manager_address is None
    assert settings.supabase_service_role_key is None
    assert (settings.log_level, settings.log_format) == ("INFO", "auto")
    assert (settings.redis_stream_key, settings.redis_stream_maxlen) == ("kektech:events", 100_000)
    assert (settings.start_block, settings.confirmations, settings.reorg_window) == (0, 0, 64)
    assert (settings.poll_interval, settings.rpc_timeout, settings.rpc_max_retries) == (1.0, 10, 5)
    assert (settings.logs_range_min, settings.logs_range_initial, settings.logs_range_max) == (
        1,
        2000,
        10_000,
    )
    assert settings.db_statement_cache_size == 100
    assert (settings.indexer_http_host, settings.indexer_http_port) == ("127.0.0.1", 9464)


def test_broadcaster_defaults() -> None:
    """With nothing set, the broadcaster gets the documented defaults."""
    settings = load_settings(BroadcasterSettings)
    assert (settings.ws_host, settings.ws_port, settings.ws_path) == ("127.0.0.1", 3180, "/ws")
    assert settings.ws_max_connections_per_ip == 200
    assert settings.ws_max_subscriptions == 100
    assert settings.ws_allowed_origins == ()
    assert settings.ws_max_message_bytes == 16_384
    assert settings.ws_send_buffer_bytes == 1_048_576
    assert settings.ws_heartbeat_interval == 30.0
    assert settings.ws_rate_limit == 20
    assert settings.ws_trusted_proxies == (ip_network("127.0.0.1"), ip_network("::1"))
    assert (settings.broadcaster_http_host, settings.broadcaster_http_port) == ("127.0.0.1", 9465)
    assert (settings.ws_unix_socket, settings.ws_unix_socket_group) == ("", "")


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after they are built."""
    settings = load_settings(IndexerSettings)
    with pytest.raises(ValueError, match="frozen"):
        settings.chain_id = 1


def test_rpc_urls_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """RPC_PROVIDER_URL is split on commas, blanks dropped, order kept."""
    monkeypatch.setenv("RPC_PROVIDER_URL", " https://a.example/rpc , ,http://b.example:8545 ")
    settings = load_settings(IndexerSettings)
    assert settings.rpc_urls() == ["https://a.example/rpc", "http://b.example:8545"]


def test_factory_addresses_are_lowercased(monkeypatch: pytest.MonkeyPatch) -> None:
    """MARKET_FACTORY_ADDRESS is split on commas and each address lowercased."""
    monkeypatch.setenv("MARKET_FACTORY_ADDRESS", f"{FACTORY_V1}, {FACTORY_V2}")
    settings = load_settings(IndexerSettings)
    assert settings.market_factory_address == (FACTORY_V1.lower(), FACTORY_V2.lower())


def test_single_addresses_are_lowercased(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ResolutionManager and RewardDistributor addresses are stored lowercase."""
    monkeypatch.setenv("RESOLUTION_MANAGER_ADDRESS", "0x10daF33E321ED8977e369a36FcC6Beb3d3d106a0")
    monkeypatch.setenv("REWARD_DISTRIBUTOR_ADDRESS", "0x3D274362423847B53E43a27b9E835d668754C96B")
    settings = load_settings(IndexerSettings)
    assert settings.resolution_manager_address == "0x10daf33e321ed8977e369a36fcc6beb3d3d106a0"
    assert settings.reward_distributor_address == "0x3d274362423847b53e43a27b9e835d668754c96b"


@pytest.mark.parametrize(
    "address",
    [
        # EIP-55's own examples, then all lowercase and all uppercase: no checksum to check.
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        "0x3eaf643482fe35d13db812946e14f5345eb60d61",
        "0x3EAF643482FE35D13DB812946E14F5345EB60D61",
    ],
)
def test_an_address_with_a_valid_checksum_or_none_is_accepted(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    """A checksummed (mixed-case) address whose checksum holds, or one in a single case."""
    monkeypatch.setenv("RESOLUTION_MANAGER_ADDRESS", address)
    assert load_settings(IndexerSettings).resolution_manager_address == address.lower()


@pytest.mark.parametrize(
    ("variable", "value", "item"),
    [
        # FACTORY_V1 with its last digit mistyped, and with one letter's case flipped.
        ("MARKET_FACTORY_ADDRESS", f"{FACTORY_V2},{FACTORY_V1[:-1]}1", "item 2: "),
        ("RESOLUTION_MANAGER_ADDRESS", FACTORY_V1.replace("eaF", "eaf"), ""),
    ],
)
def test_an_address_whose_checksum_does_not_match_is_refused(
    variable: str, value: str, item: str
) -> None:
    """A mixed-case address carries an EIP-55 checksum: a typo in one character is caught
    instead of followed (an address with nothing deployed indexes nothing)."""
    error = config_error(IndexerSettings, **{variable: value})
    assert error.variable == variable
    assert error.reason == (
        f"{item}the EIP-55 checksum (the case of the letters) does not match: check the "
        "address for a typo; one written all in lowercase skips the check"
    )


def test_empty_optional_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`VAR=` for an optional value leaves it None rather than failing validation."""
    for name in ("RESOLUTION_MANAGER_ADDRESS", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
        monkeypatch.setenv(name, "")
    settings = load_settings(IndexerSettings)
    assert settings.resolution_manager_address is None
    assert settings.supabase_url is None
    assert settings.supabase_service_role_key is None


def test_broadcaster_lists_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """WS_ALLOWED_ORIGINS and WS_TRUSTED_PROXIES are split on commas and normalized."""
    monkeypatch.setenv("WS_ALLOWED_ORIGINS", "https://KekTech.xyz/, http://localhost:3000")
    monkeypatch.setenv("WS_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.7 ,::1")
    settings = load_settings(BroadcasterSettings)
    assert settings.ws_allowed_origins == ("https://kektech.xyz", "http://localhost:3000")
    assert settings.ws_trusted_proxies == (
        ip_network("10.0.0.0/8"),
        ip_network("192.168.1.7"),
        ip_network("::1"),
    )


def test_an_origin_drops_its_schemes_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Browsers leave the default port out of Origin, so an allowed origin written with it is
    stored without it; any other port stays."""
    monkeypatch.setenv(
        "WS_ALLOWED_ORIGINS",
        "https://KekTech.xyz:443,http://localhost:80,https://a.example:80,http://[::1]:80,"
        "http://[::1]:8080",
    )
    assert load_settings(BroadcasterSettings).ws_allowed_origins == (
        "https://kektech.xyz",
        "http://localhost",
        "https://a.example:80",
        "http://[::1]",
        "http://[::1]:8080",
    )


@pytest.mark.parametrize(
    ("instance", "ports", "socket"),
    [("0", (3180, 9465), "/run/k/ws.sock"), ("2", (3182, 9467), "/run/k/ws.sock.2")],
)
def test_instance_index_offsets_ports_and_unix_socket(
    monkeypatch: pytest.MonkeyPatch, instance: str, ports: tuple[int, int], socket: str
) -> None:
    """PM2 gives every instance the same environment but its index: instance i listens on
    the base ports + i and, past the first, on its own Unix socket."""
    monkeypatch.setenv("BROADCASTER_INSTANCE", instance)
    monkeypatch.setenv("WS_UNIX_SOCKET", "/run/k/ws.sock")
    settings = load_settings(BroadcasterSettings)
    assert (settings.ws_port, settings.broadcaster_http_port) == ports
    assert settings.ws_unix_socket == socket


def test_the_socket_group_holds_for_every_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """WS_UNIX_SOCKET_GROUP is read without the blanks around it, and the same for each PM2
    instance, whose socket is PATH.i."""
    monkeypatch.setenv("BROADCASTER_INSTANCE", "1")
    monkeypatch.setenv("WS_UNIX_SOCKET", "/run/k/ws.sock")
    monkeypatch.setenv("WS_UNIX_SOCKET_GROUP", " kektech-ws ")
    settings = load_settings(BroadcasterSettings)
    assert (settings.ws_unix_socket, settings.ws_unix_socket_group) == (
        "/run/k/ws.sock.1",
        "kektech-ws",
    )


@pytest.mark.parametrize("group", ["www data", "www-data,kektech-ws", "33", "-g", "g" * 33])
def test_a_socket_group_that_is_not_a_group_name_is_refused(group: str) -> None:
    """WS_UNIX_SOCKET_GROUP takes one group name: not a list, a number or an option."""
    error = config_error(
        BroadcasterSettings, WS_UNIX_SOCKET="/run/k/ws.sock", WS_UNIX_SOCKET_GROUP=group
    )
    assert error.variable == "WS_UNIX_SOCKET_GROUP"
    assert "must be one group name" in error.reason


def test_instances_sharing_ws_port_with_reuse_port_keep_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With WS_REUSE_PORT the instances share WS_PORT (the kernel spreads connections); each
    still gets its own operations port, which cannot be shared."""
    monkeypatch.setenv("BROADCASTER_INSTANCE", "2")
    monkeypatch.setenv("WS_REUSE_PORT", "true")
    settings = load_settings(BroadcasterSettings)
    assert (settings.ws_port, settings.broadcaster_http_port) == (3180, 9467)


def test_empty_trusted_proxies_trusts_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty WS_TRUSTED_PROXIES means no proxy is trusted, not the default list."""
    monkeypatch.setenv("WS_TRUSTED_PROXIES", "")
    assert load_settings(BroadcasterSettings).ws_trusted_proxies == ()


def test_log_level_and_format_ignore_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOG_LEVEL=debug and LOG_FORMAT=JSON are accepted and normalized."""
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    settings = load_settings(BroadcasterSettings)
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")


def test_variable_names_are_case_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the exact upper-case name is read: chain_id=1 is ignored."""
    monkeypatch.setenv("chain_id", "1")
    assert load_settings(IndexerSettings).chain_id == 32323


def test_dotenv_file_is_read(clean_env: Path) -> None:
    """A .env file in the working directory supplies values."""
    (clean_env / ".env").write_text(f"CHAIN_ID=1337\nMARKET_FACTORY_ADDRESS={FACTORY_V1}\n")
    settings = load_settings(IndexerSettings)
    assert settings.chain_id == 1337
    assert settings.market_factory_address == (FACTORY_V1.lower(),)


def test_environment_overrides_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real environment variable wins over the same name in .env."""
    (clean_env / ".env").write_text("CHAIN_ID=1337\n")
    monkeypatch.setenv("CHAIN_ID", "7")
    assert load_settings(IndexerSettings).chain_id == 7


@pytest.mark.parametrize("cls", [IndexerSettings, BroadcasterSettings, OpsSettings])
def test_env_example_loads_to_defaults(cls: type[ServiceSettings], clean_env: Path) -> None:
    """The repository's .env.example, used as .env, is valid and equals the defaults."""
    shutil.copy(REPO_ROOT / ".env.example", clean_env / ".env")
    from_example = load_settings(cls)
    (clean_env / ".env").unlink()
    assert from_example == load_settings(cls)


def test_env_example_lists_every_variable() -> None:
    """.env.example mentions every variable the services and the ops tools read."""
    text = (REPO_ROOT / ".env.example").read_text()
    assert [name for name in ALL_VARIABLES if f"\n{name}=" not in text] == []


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("MARKET_FACTORY_ADDRESS", f"{FACTORY_V1},0x1234", "item 2: expected 0x"),
        ("MARKET_FACTORY_ADDRESS", f"{FACTORY_V1},{FACTORY_V1.lower()}", "listed twice"),
        ("RESOLUTION_MANAGER_ADDRESS", "0xnothex", "expected 0x"),
        ("RPC_PROVIDER_URL", "ws://node.example/KEY-abc", "scheme must be http or https"),
        ("RPC_PROVIDER_URL", "", "at least one URL"),
        ("RPC_PROVIDER_URL", " , ", "at least one URL"),
        # An empty label cannot be looked up (IDNA refuses it): said now, not at connect time.
        ("RPC_PROVIDER_URL", "http://rpc..example.com/KEY-abc", "not a valid host name"),
        ("DATABASE_URL", "postgresql://u:hunter2@db..local/x", "not a valid host name"),
        ("DATABASE_URL", "mysql://root:hunter2@db/x", "scheme must be postgres or postgresql"),
        ("REDIS_URL", "http://:hunter2@cache:6379", "scheme must be redis, rediss or unix"),
        ("REDIS_URL", "redis://:hunter2@", "no host"),
        # asyncpg splits user:password@host at the first @, urlsplit at the last: refused.
        ("DATABASE_URL", "postgres://kek:p@ssw0rd@127.0.0.1:5432/db", "as %40"),
        ("REDIS_URL", "redis://default:p@ss@127.0.0.1:6379/0", "as %40"),
        ("RPC_PROVIDER_URL", "https://rpc.example/a,https://u:p@ss@rpc.example/", "item 2: more"),
        ("SUPABASE_URL", "http://project.supabase.co", "scheme must be https"),
        ("START_BLOCK", "-1", "greater than or equal to 0"),
        ("CHAIN_ID", "basedai", "valid integer"),
        ("CHAIN_ID", "0", "greater than 0"),
        ("POLL_INTERVAL", "61", "less than or equal to 60"),
        ("POLL_INTERVAL", "0.00001", "must be at least 0.05 seconds: each poll is a JSON-RPC"),
        ("POLL_INTERVAL", "0", "must be at least 0.05 seconds"),
        ("REDIS_STREAM_MAXLEN", "999", "greater than or equal to 1000"),
        ("LOG_LEVEL", "TRACE", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
        ("LOGS_RANGE_INITIAL", "20000", "between LOGS_RANGE_MIN and LOGS_RANGE_MAX"),
        ("INDEXER_HTTP_PORT", "70000", "less than or equal to 65535"),
    ],
)
def test_indexer_error_names_the_variable(variable: str, value: str, reason: str) -> None:
    """A malformed indexer value fails with a ConfigError naming exactly that variable."""
    error = config_error(IndexerSettings, **{variable: value})
    assert error.variable == variable
    assert reason in error.reason
    assert str(error) == f"invalid setting {variable}: {error.reason}"


@pytest.mark.parametrize(
    ("variable", "other"),
    [
        ("RESOLUTION_MANAGER_ADDRESS", "MARKET_FACTORY_ADDRESS"),
        ("REWARD_DISTRIBUTOR_ADDRESS", "MARKET_FACTORY_ADDRESS"),
        ("REWARD_DISTRIBUTOR_ADDRESS", "RESOLUTION_MANAGER_ADDRESS"),
    ],
)
def test_one_address_in_two_roles_is_refused(variable: str, other: str) -> None:
    """A contract has one role: the same address given for two (a copy-paste slip) would
    have its logs decoded as only one of them, a factory's as anything else losing every
    market, so the pair is refused at start, whatever the case of its letters."""
    env = {other: f"{FACTORY_V2},{FACTORY_V1}" if other == "MARKET_FACTORY_ADDRESS" else FACTORY_V1}
    error = config_error(IndexerSettings, **env, **{variable: FACTORY_V1.upper().replace("X", "x")})
    assert error.variable == variable
    assert f"also in {other}" in error.reason


def test_the_shortest_poll_interval_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """POLL_INTERVAL=0.05, twenty polls a second, is the least allowed."""
    monkeypatch.setenv("POLL_INTERVAL", "0.05")
    assert load_settings(IndexerSettings).poll_interval == 0.05


def test_a_reorg_window_below_confirmations_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """REORG_WINDOW counts indexed blocks, from the cursor CONFIRMATIONS behind the head: a
    window smaller than CONFIRMATIONS still covers the newest indexed blocks (it was refused
    while the window counted from the head, when it covered none of them)."""
    monkeypatch.setenv("CONFIRMATIONS", "10")
    monkeypatch.setenv("REORG_WINDOW", "4")
    settings = load_settings(IndexerSettings)
    assert (settings.confirmations, settings.reorg_window) == (10, 4)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("MONITOR_WS_URL", "wss://ws.kektech.xyz:99999/ws", "not a valid URL"),
        ("MONITOR_WS_URL", "https://ws.kektech.xyz/ws", "scheme must be ws or wss"),
        ("MONITOR_WS_URL", "wss://ws..kektech.xyz/ws", "not a valid host name"),
        ("OPS_TLS_ENDPOINT", "ws..kektech.xyz:443", "not a valid host name"),
        # Empty, a check would have nothing to look at and pass in silence:
        ("DOCTOR_BROADCASTER_PORTS", "", "at least one item"),
        ("OPS_PM2_APPS", " , ", "at least one item"),
        ("MONITOR_STATE_FILE", "", "a file path is required"),
    ],
)
def test_ops_error_names_the_variable(variable: str, value: str, reason: str) -> None:
    """The ops tools refuse an endpoint they could not probe when they load, not mid-run."""
    error = config_error(OpsSettings, **{variable: value})
    assert error.variable == variable
    assert reason in error.reason


def test_a_default_in_conflict_is_named_as_its_variable() -> None:
    """Setting one bound below another's default names the other by its variable name."""
    error = config_error(OpsSettings, DOCTOR_TLS_WARN_DAYS="5")  # the fail default is 7
    assert str(error) == (
        "invalid setting DOCTOR_TLS_FAIL_DAYS: must not be above DOCTOR_TLS_WARN_DAYS"
    )


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("WS_PATH", "ws", "must start with /"),
        # The path a request names, without its query: no client could reach these.
        ("WS_PATH", "/ws?v=1", "a path alone"),
        ("WS_PATH", "/ws#top", "a path alone"),
        ("WS_PATH", "/ws ", "a path alone"),
        ("WS_ALLOWED_ORIGINS", "https://kektech.xyz/app", "no path"),
        ("WS_TRUSTED_PROXIES", "127.0.0.1,proxy.local", "item 2: expected an IP address"),
        ("WS_PORT", "0", "greater than or equal to 1"),
        ("WS_RATE_LIMIT", "0", "greater than or equal to 0.05"),
        # A group for no socket is a slip: the operator meant to serve Nginx on one.
        ("WS_UNIX_SOCKET_GROUP", "kektech-ws", "needs WS_UNIX_SOCKET"),
    ],
)
def test_broadcaster_error_names_the_variable(variable: str, value: str, reason: str) -> None:
    """A malformed broadcaster value fails with a ConfigError naming exactly that variable."""
    error = config_error(BroadcasterSettings, **{variable: value})
    assert error.variable == variable
    assert reason in error.reason


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("RPC_PROVIDER_URL", "ftp://user:s3cr3t-rpc-key@node.example/v2/s3cr3t-path", "s3cr3t"),
        ("RPC_PROVIDER_URL", "https://node.example:99999/v2/s3cr3t-path", "s3cr3t"),
        ("DATABASE_URL", "mysql://root:s3cr3t-db@db.example/x", "s3cr3t"),
        ("REDIS_URL", "http://:s3cr3t-redis@cache.example", "s3cr3t"),
        ("DATABASE_URL", "postgres://kek:s3cr3t@db@db.example/x", "s3cr3t"),
        ("DATABASE_URL", "postgresql://kek:s3cr3t-pw@db.example:99999/x", "s3cr3t"),
        ("REDIS_URL", "redis://:s3cr3t-redis@", "s3cr3t"),
    ],
)
def test_error_never_contains_the_secret(variable: str, value: str, secret: str) -> None:
    """The ConfigError for a bad secret URL says nothing of the URL itself."""
    error = config_error(IndexerSettings, **{variable: value})
    assert error.variable == variable
    assert secret not in str(error)
    assert secret not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_a_secret_the_message_happens_to_contain_is_not_shown() -> None:
    """A message that would show a secret, even by coincidence, gives way to the error type:
    "URL scheme must be postgres or postgresql" would show this password."""
    error = config_error(IndexerSettings, DATABASE_URL="mysql://root:postgresql@db.example/x")
    assert str(error) == "invalid setting DATABASE_URL: value error"


@pytest.mark.parametrize(
    ("cls", "env", "expected"),
    [
        (
            IndexerSettings,
            {"LOG_LEVEL": "warn"},
            "LOG_LEVEL: input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
        ),
        (
            OpsSettings,
            {"OPS_TLS_ENDPOINT": "ws.kektech.xyz"},
            "OPS_TLS_ENDPOINT: expected host:port, e.g. ws.kektech.xyz:443",
        ),
    ],
)
def test_a_message_that_contains_a_plain_value_is_kept(
    cls: type[ServiceSettings], env: dict[str, str], expected: str
) -> None:
    """A value that is no secret may appear in its message (WARN in 'WARNING', the example
    host, CONFIRMATIONS' number): the message is kept, not replaced by its error type."""
    assert str(config_error(cls, **env)).startswith(f"invalid setting {expected}")


def test_missing_setting_message() -> None:
    """A ConfigError for a missing variable reads "missing setting X"."""
    assert str(ConfigError("DATABASE_URL", "required", missing=True)) == (
        "missing setting DATABASE_URL"
    )


def test_settings_or_exit_prints_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """settings_or_exit reports a bad value as one stderr line and exits with status 2."""
    monkeypatch.setenv("RPC_PROVIDER_URL", "ftp://user:s3cr3t@node.example")
    with pytest.raises(SystemExit) as caught:
        settings_or_exit(IndexerSettings)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "kektech: invalid setting RPC_PROVIDER_URL: item 1: URL scheme must be http or https\n"
    )


def test_settings_or_exit_returns_valid_settings() -> None:
    """settings_or_exit returns the settings when they are valid."""
    assert settings_or_exit(BroadcasterSettings).ws_port == 3180


SECRETS = {
    "DATABASE_URL": "postgresql://kektech:db-pa55word@db.example:6543/postgres",
    "REDIS_URL": "rediss://default:redis-pa55word@cache.example:6380/0",
    "RPC_PROVIDER_URL": "https://rpc.example/v2/rpc-api-key-0123456789,https://b.example/?apikey=k2",
    "SUPABASE_SERVICE_ROLE_KEY": "eyJhbGciOiJIUzI1NiJ9.service-role-key",
}
SECRET_WORDS = ("db-pa55word", "redis-pa55word", "rpc-api-key", "apikey=k2", "service-role-key")


def test_secrets_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """repr, str, model_dump and model_dump_json never contain a secret value."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(IndexerSettings)
    shown = "\n".join(
        [
            repr(settings),
            str(settings),
            str(settings.model_dump()),
            settings.model_dump_json(),
            repr(settings.rpc_provider_url),
        ]
    )
    assert [word for word in SECRET_WORDS if word in shown] == []


def test_plain_secret_values_are_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code that needs a secret gets it explicitly via rpc_urls() or get_secret_value()."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(IndexerSettings)
    assert settings.rpc_urls() == SECRETS["RPC_PROVIDER_URL"].split(",")
    assert settings.database_url.get_secret_value() == SECRETS["DATABASE_URL"]
    assert isinstance(settings.supabase_service_role_key, SecretStr)
    assert (
        settings.supabase_service_role_key.get_secret_value()
        == (SECRETS["SUPABASE_SERVICE_ROLE_KEY"])
    )


def test_log_secrets_lists_secret_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """log_secrets returns passwords, path/query API keys and bare secrets, not hosts."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    secrets = load_settings(IndexerSettings).log_secrets()
    assert set(secrets) == {
        *SECRETS["RPC_PROVIDER_URL"].split(","),  # whole URLs too (a provider may echo one)
        SECRETS["DATABASE_URL"],
        SECRETS["REDIS_URL"],
        "db-pa55word",
        "redis-pa55word",
        "rpc-api-key-0123456789",
        "eyJhbGciOiJIUzI1NiJ9.service-role-key",
    }


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://rpc.example/mainnet/v2/abcdSECRETKEY12", "abcdSECRETKEY12"),  # letters+digits
        ("https://rpc.example/mainnet/?dkey=SECRET12", "SECRET12"),  # any query value of 8+
        ("https://rpc.example/mainnet/v2/AbCdEfGhIjKlMnOpQr", "AbCdEfGhIjKlMnOpQr"),
        # A key as the first label of the host name, as Rivet issues them.
        ("https://0123456789abcdef0123456789abcdef.mainnet.rpc.example/", "0123456789abcdef" * 2),
        ("https://ab12cd34ef.mainnet.rpc.example:8545/", "ab12cd34ef"),
    ],
)
def test_short_api_keys_are_secret_too(
    monkeypatch: pytest.MonkeyPatch, url: str, secret: str
) -> None:
    """Keys shorter than the providers' usual 32 characters are still found, in the path, the
    query or the host name; route segments and host labels such as "v2" or "mainnet" are not."""
    monkeypatch.setenv("RPC_PROVIDER_URL", url)
    secrets = load_settings(IndexerSettings).log_secrets()
    assert secret in secrets
    assert "mainnet" not in secrets
    assert "v2" not in secrets


def test_unreadable_dotenv_is_a_config_error(clean_env: Path) -> None:
    """A .env that is not UTF-8 gives a ConfigError, not a traceback."""
    (clean_env / ".env").write_bytes(b"CHAIN_ID=\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"invalid setting \.env: file is not UTF-8 text"):
        load_settings(IndexerSettings)


def test_a_dotenv_line_that_cannot_be_parsed_is_a_config_error(clean_env: Path) -> None:
    """A .env line python-dotenv cannot parse (a quote left open) would be skipped with a
    warning, and the service would start on that variable's default: it is refused instead,
    by its line number, without quoting the line (it may hold a secret)."""
    (clean_env / ".env").write_text(
        "CHAIN_ID=32323\n# factories v1, v2\n\n"
        f'MARKET_FACTORY_ADDRESS="{FACTORY_V1},{FACTORY_V2}\n'
        "DATABASE_URL=postgresql://kektech:s3cr3t-db@127.0.0.1:5432/kektech\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(IndexerSettings)
    assert str(caught.value) == (
        "invalid setting .env: line 4 cannot be parsed (an unclosed quote?)"
    )
    assert FACTORY_V1 not in str(caught.value)


def test_settings_or_exit_stops_on_a_dotenv_line_that_cannot_be_parsed(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service given such a .env prints the one line and exits 2, like any invalid setting."""
    (clean_env / ".env").write_text("LOG_LEVEL=INFO\nREDIS_URL='redis://:s3cr3t@cache:6379\n")
    with pytest.raises(SystemExit) as caught:
        settings_or_exit(BroadcasterSettings)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "kektech: invalid setting .env: line 2 cannot be parsed (an unclosed quote?)\n"
    )


@pytest.mark.parametrize("cls", [IndexerSettings, BroadcasterSettings, OpsSettings])
@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            f"MARKET_FACTORY_ADRESS={FACTORY_V1}",
            "unknown variable MARKET_FACTORY_ADRESS (did you mean MARKET_FACTORY_ADDRESS?)",
        ),
        ("CONFIRMATION=12", "unknown variable CONFIRMATION (did you mean CONFIRMATIONS?)"),
        (
            "redis_url=redis://cache:6379/0",
            "unknown variable redis_url (names are upper case: REDIS_URL)",
        ),
        (
            "KEKTECH_BROADCASTER_INSTANCES=3",
            "unknown variable KEKTECH_BROADCASTER_INSTANCES (ecosystem.config.js reads "
            "KEKTECH_* from /etc/kektech/ecosystem.env, see docs/pm2.md)",
        ),
        (
            "FACTORY=0x1",
            "unknown variable FACTORY (no setting has a similar name; see .env.example)",
        ),
    ],
)
def test_a_dotenv_variable_no_one_reads_is_refused(
    cls: type[ServiceSettings], line: str, reason: str, clean_env: Path
) -> None:
    """A misspelled name in .env would be ignored and its setting take the default (an empty
    MARKET_FACTORY_ADDRESS indexes no market): every service and tool refuses it, naming the
    file, the line and the closest name it reads."""
    (clean_env / ".env").write_text(f"CHAIN_ID=32323\n\n# the factories\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(cls)
    assert str(caught.value) == f"invalid setting .env: line 4: {reason}"


def test_a_value_wrapped_onto_a_line_of_its_own_is_refused_without_quoting_it(
    clean_env: Path,
) -> None:
    """A key wrapped onto its own line reads as a variable with no value: the message said
    "unknown variable <the key>" in PM2's logs. It says where, and what is likely wrong."""
    secret = "Kx7secretPATHkey1234abcd"
    (clean_env / ".env").write_text(
        f"CHAIN_ID=32323\nRPC_PROVIDER_URL=https://rpc.example/v2/\n{secret}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(IndexerSettings)
    assert str(caught.value) == (
        "invalid setting .env: line 3 has no '=' (a value wrapped onto a line of its own?)"
    )
    assert secret not in str(caught.value)


def test_the_other_services_variables_in_dotenv_are_accepted(clean_env: Path) -> None:
    """Both services and the ops tools share one .env: each accepts the others' names."""
    (clean_env / ".env").write_text(
        "WS_PORT=3190\nCONFIRMATIONS=3\nDOCTOR_MAX_LAG_BLOCKS=7\nPM2_HOME=/tmp/pm2\n"
    )
    assert load_settings(IndexerSettings).confirmations == 3
    assert load_settings(BroadcasterSettings).ws_port == 3190
    assert load_settings(OpsSettings).doctor_max_lag_blocks == 7


def test_a_misspelled_ops_variable_is_refused_by_the_ops_tools_only(clean_env: Path) -> None:
    """The services let the ops tools' names (OPS_*, DOCTOR_*, MONITOR_*) through unread;
    `kektech doctor` and `kektech check`, which read them, refuse a misspelled one."""
    (clean_env / ".env").write_text("MONITOR_WS_ULR=wss://ws.example/ws\n")
    load_settings(IndexerSettings)
    load_settings(BroadcasterSettings)
    with pytest.raises(ConfigError, match=r"line 1: unknown variable MONITOR_WS_ULR \(did you "):
        load_settings(OpsSettings)


def test_every_ops_variable_is_let_through_by_the_services() -> None:
    """The names the services leave to the ops tools cover every variable only those read."""
    services = {n for cls in (IndexerSettings, BroadcasterSettings) for n in cls.model_fields}
    for name in OpsSettings.model_fields.keys() - services:
        assert name.upper().startswith(ServiceSettings.env_names_of_others), name


def test_only_the_dotenv_file_is_checked_for_unknown_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process environment is shared with PM2, the shell and more: a name there that no
    service reads is none of their business."""
    monkeypatch.setenv("CONFIRMATION", "12")
    assert load_settings(IndexerSettings).confirmations == 0


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "1e999"])
@pytest.mark.parametrize(
    ("variable", "cls"), FLOAT_VARIABLES, ids=[name for name, _ in FLOAT_VARIABLES]
)
def test_a_number_that_is_not_finite_is_refused(
    variable: str, cls: type[ServiceSettings], value: str
) -> None:
    """inf or nan (1e999 is inf too) is no number of seconds or days: RPC_TIMEOUT=inf failed
    every RPC call with an OverflowError naming no setting, MONITOR_DOWN_AFTER=inf kept check
    silent with both services down. Each is refused by its variable's name."""
    error = config_error(cls, **{variable: value})
    assert error.variable == variable
    assert "finite number" in error.reason


@pytest.mark.parametrize(
    ("cls", "variable"),
    [
        (IndexerSettings, "RPC_TIMEOUT"),
        (IndexerSettings, "DB_COMMAND_TIMEOUT"),
        (BroadcasterSettings, "WS_HEARTBEAT_INTERVAL"),
        (BroadcasterSettings, "WS_HEARTBEAT_TIMEOUT"),
        (BroadcasterSettings, "WS_HANDSHAKE_TIMEOUT"),
        (BroadcasterSettings, "BROADCASTER_REDIS_TIMEOUT"),
        (OpsSettings, "MONITOR_DOWN_AFTER"),
        (OpsSettings, "MONITOR_RESTART_WINDOW"),
    ],
)
def test_a_timeout_or_interval_above_a_day_is_refused(
    cls: type[ServiceSettings], variable: str
) -> None:
    """A wait of more than a day is a slip (a value in milliseconds, a stray digit); past
    about 24.8 days the event loop could not even wait that long (OverflowError)."""
    error = config_error(cls, **{variable: "1e300"})
    assert error.variable == variable
    assert f"less than or equal to {DAY}" in error.reason
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(variable, str(DAY))
        assert getattr(load_settings(cls), variable.lower()) == DAY


def _integer_variables() -> list[tuple[type[ServiceSettings], str]]:
    return [
        (cls, name.upper())
        for cls in (IndexerSettings, BroadcasterSettings, OpsSettings)
        for name, field in cls.model_fields.items()
        if field.annotation is int
    ]


@pytest.mark.parametrize(("cls", "variable"), _integer_variables())
def test_an_integer_past_what_its_consumers_take_is_refused(
    cls: type[ServiceSettings], variable: str
) -> None:
    """Every count, size and block number is bounded: above 2^63 - 1, what Postgres, Redis
    and the C structures below Python take, a value was accepted, then crashed the service
    (WS_HISTORY_SIZE at start, OUTBOX_KEEP at its first prune), kept it from answering anyone
    (WS_SEND_BUFFER_BYTES) or from publishing anything (REDIS_STREAM_MAXLEN)."""
    error = config_error(cls, **{variable: str(2**63)})
    assert error.variable == variable
    assert "less than or equal to" in error.reason


def test_a_raw_at_sign_in_a_password_is_refused_with_the_fix() -> None:
    """A raw @ in the password passed as valid, then asyncpg (which splits at the first @)
    looked up "ssw0rd@127.0.0.1" as a host name: refused now, saying how to write it."""
    error = config_error(IndexerSettings, DATABASE_URL="postgres://kek:p@ssw0rd@127.0.0.1/db")
    assert str(error) == (
        "invalid setting DATABASE_URL: more than one @ before the host: "
        "percent-encode @ in the password as %40"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://rpcuser:pa\u20acss1234word@127.0.0.1:8545",
        "https://op%E2%82%AC:key1234@rpc.example/",
    ],
    ids=["raw", "percent-encoded"],
)
def test_rpc_credentials_http_basic_cannot_send_are_refused(url: str) -> None:
    """aiohttp sends an RPC URL's credentials as HTTP Basic authentication, in Latin-1: a
    password with a euro sign passed as valid, then every request raised UnicodeEncodeError
    (a raw traceback, not the one line of a bad setting). The message does not quote it."""
    error = config_error(IndexerSettings, RPC_PROVIDER_URL=url)
    assert error.variable == "RPC_PROVIDER_URL"
    assert "HTTP Basic authentication cannot send" in error.reason
    assert "1234" not in str(error)
    with pytest.MonkeyPatch.context() as patch:
        for sendable in ("https://op:caf\u00e9@rpc.example/", "https://op%E9:x@rpc.example/"):
            patch.setenv("RPC_PROVIDER_URL", sendable)  # Latin-1; not UTF-8, sent encoded
            load_settings(IndexerSettings)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "postgres://kek:p%40ssw0rd@127.0.0.1:5432/db"),
        ("DATABASE_URL", "postgresql:///kektech?host=/var/run/postgresql&user=a@b"),
        ("REDIS_URL", "redis://default:p%40ss@127.0.0.1:6379/0"),
        ("REDIS_URL", "unix:///run/redis/redis.sock?password=p@ss"),
        ("RPC_PROVIDER_URL", "https://rpc.example/v2/key@team?email=ops@kektech.xyz#a@b"),
        ("RPC_PROVIDER_URL", "https://ops:p%40ss@[::1]:8545/"),
    ],
)
def test_an_at_sign_outside_the_credentials_is_still_accepted(variable: str, value: str) -> None:
    """An encoded @ in the password, or an @ in a path, query or fragment, is a valid URL."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(variable, value)
        load_settings(IndexerSettings)


@pytest.mark.parametrize(
    ("cls", "variable"),
    [
        (BroadcasterSettings, "WS_HOST"),
        (BroadcasterSettings, "BROADCASTER_HTTP_HOST"),
        (IndexerSettings, "INDEXER_HTTP_HOST"),
        (OpsSettings, "DOCTOR_BROADCASTER_HOST"),
    ],
)
@pytest.mark.parametrize(
    "host",
    [
        *("not a host!", "127.0.0.1:9464", "[::1]", "-x.example", "a..b"),
        *("127.0.0.256", "999.1.1.1", "1.2.3.4.5", "0x7f.1", "10.0.0"),
    ],
)
def test_a_listen_host_that_is_no_host_is_refused(
    cls: type[ServiceSettings], variable: str, host: str
) -> None:
    """A host setting takes an IP address or a host name: a port, brackets or a typo would
    only fail when the service binds (or a probe connects), after its start was reported."""
    error = config_error(cls, **{variable: host})
    assert error.variable == variable
    assert "an IP address (such as 127.0.0.1 or ::1) or a host name" in error.reason


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "ws-1.lan"])
def test_listen_hosts_take_addresses_and_names(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("WS_HOST", f" {host} ")
    monkeypatch.setenv("INDEXER_HTTP_HOST", host)
    assert load_settings(BroadcasterSettings).ws_host == host
    assert load_settings(IndexerSettings).indexer_http_host == host


def test_a_fractional_looking_instance_index_still_offsets_the_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BROADCASTER_INSTANCE=1.0 is read as instance 1, so its ports are offset as instance 1's:
    they were left at the base, where instance 0 listens."""
    monkeypatch.setenv("BROADCASTER_INSTANCE", "1.0")
    settings = load_settings(BroadcasterSettings)
    assert (settings.broadcaster_instance, settings.ws_port) == (1, 3181)
    assert settings.broadcaster_http_port == 9466


@pytest.mark.parametrize(
    ("env", "instance"),
    [({"WS_PORT": "9465"}, "0"), ({"WS_PORT": "3181", "BROADCASTER_HTTP_PORT": "3180"}, "1")],
)
def test_the_websocket_port_and_the_operations_port_must_differ(
    env: dict[str, str], instance: str
) -> None:
    """The two listeners of one instance on one port: the second bind would fail at start
    (with WS_REUSE_PORT, instance 1's operations port lands on the shared WS_PORT)."""
    error = config_error(
        BroadcasterSettings, BROADCASTER_INSTANCE=instance, WS_REUSE_PORT="true", **env
    )
    assert error.variable == "BROADCASTER_HTTP_PORT"
    assert "is also WS_PORT" in error.reason


def test_a_message_rate_too_low_to_ping_is_refused() -> None:
    """WS_RATE_LIMIT=1e-300 would let a client send one message, ever; the frontend pings
    every 30 s."""
    error = config_error(BroadcasterSettings, WS_RATE_LIMIT="1e-300")
    assert error.variable == "WS_RATE_LIMIT"
    assert "greater than or equal to 0.05" in error.reason


def test_a_relative_unix_socket_path_is_refused() -> None:
    """A relative WS_UNIX_SOCKET would be found from whatever directory PM2 starts in, and
    Nginx's proxy_pass names an absolute path."""
    error = config_error(BroadcasterSettings, WS_UNIX_SOCKET="run/ws.sock")
    assert error.variable == "WS_UNIX_SOCKET"
    assert "absolute path" in error.reason


def test_credentials_in_the_monitored_url_are_refused() -> None:
    """`kektech check` prints MONITOR_WS_URL in its alerts and keeps it in its state file,
    and its probe sends no credentials: a URL with a user or password is refused, unquoted."""
    error = config_error(OpsSettings, MONITOR_WS_URL="wss://ops:hunter2secret@ws.example/ws")
    assert error.variable == "MONITOR_WS_URL"
    assert "no user or password" in error.reason
    assert "hunter2secret" not in str(error)
