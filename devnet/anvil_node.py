"""A throwaway anvil chain on loopback."""

from __future__ import annotations

import os
import urllib.request

import orjson

from devnet.process import REPO_ROOT, Process, Service, ServiceError, wait_until, which

# Deterministic genesis time for the dev chain (2025-11-06T00:00:00Z, the mainnet deploy day).
ANVIL_GENESIS_TIMESTAMP = 1762387200
ANVIL_CHAIN_ID = 32323


def anvil_binary() -> str:
    """Return the anvil installed by npm in the repo (or one on PATH)."""
    local = REPO_ROOT / "node_modules" / ".bin" / "anvil"
    if local.exists():
        return str(local)
    return which("anvil", "run `scripts/install.sh` (npm package @foundry-rs/anvil)")


class Anvil(Service):
    """A local chain with chain id 32323 that mines only when asked (`evm_mine`)."""

    name = "anvil"

    def __init__(
        self,
        *,
        port: int | None = None,
        automine: bool = False,
        block_time: float | None = None,
        timestamp: int = ANVIL_GENESIS_TIMESTAMP,
    ) -> None:
        super().__init__(port=port)
        self.automine = automine
        self.block_time = block_time
        self.timestamp = timestamp

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            anvil_binary(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(ANVIL_CHAIN_ID),
            "--timestamp",
            str(self.timestamp),
            "--order",
            "fifo",
            "--gas-limit",
            "1000000000",
            "--silent",
        ]
        if self.block_time is not None:
            argv += ["--block-time", str(self.block_time)]
        elif not self.automine:
            argv.append("--no-mining")
        # anvil keeps block states past its in-memory limit under $HOME/.foundry/anvil/tmp and
        # does not remove them when stopped: with HOME in the workdir, close() removes them.
        env = {**os.environ, "HOME": str(self.workdir)}
        self._process = Process(self.name, argv, self.workdir / "anvil.log", env=env)
        self._process.spawn()
        wait_until("anvil", self._answers, self._process)
        if self.block_time is None:
            # Each block one second after the previous, whatever the wall clock does: the same
            # transactions then give the same blocks, hashes included.
            self._rpc("anvil_setBlockTimestampInterval", [1])

    def _rpc(self, method: str, params: list[object]) -> object:
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        request = urllib.request.Request(  # noqa: S310 - loopback URL we built ourselves
            self.rpc_url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            reply = orjson.loads(response.read())
        if "error" in reply:
            raise ServiceError(f"anvil {method} failed: {reply['error']}")
        return reply.get("result")

    def _answers(self) -> bool:
        return int(str(self._rpc("eth_chainId", [])), 16) == ANVIL_CHAIN_ID
