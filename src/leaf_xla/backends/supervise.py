"""Starting the replica processes, and failing together: a failure of any replica stops all of
them and becomes one error line in the launching process."""

from __future__ import annotations

import errno
import json
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from leaf_xla.errors import UserError

# Where a spawned replica reports its failure (set in each spawned process), read by the
# launching process to print the job's one error.
report_dir: str | None = None


def _peer_lost(err: BaseException) -> bool:
    """An error that only says another replica went away (it failed first)."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def describe_error(err: BaseException) -> tuple[str, str]:
    """(kind, message): kind is user (an expected mistake, one line), peer (another replica
    failed first) or crash (a bug: the traceback)."""
    if isinstance(err, UserError):
        return "user", str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        where = f" {err.filename}" if err.filename else ""
        return "user", f"cannot write{where}: {err.strerror}; free space, then --resume"
    if _peer_lost(err):
        return "peer", str(err).splitlines()[0]
    return "crash", "".join(traceback.format_exception(err))


def report(report_dir: str, rank: int, err: BaseException) -> None:
    kind, message = describe_error(err)
    path = Path(report_dir) / f"rank{rank:05d}.json"
    path.write_text(json.dumps({"rank": rank, "kind": kind, "message": message, "t": time.time()}))


def raise_reported(report_dir: str, exit_codes: dict[int, int | None]) -> None:
    """The job failed: raise its first cause as one error, read from the replicas' reports."""
    reports = [json.loads(p.read_text()) for p in sorted(Path(report_dir).glob("rank*.json"))]
    for kind in ("user", "crash"):
        mine = sorted((r for r in reports if r["kind"] == kind), key=lambda r: r["t"])
        if mine and kind == "user":
            raise UserError(mine[0]["message"])
        if mine:
            print(mine[0]["message"], file=sys.stderr, end="")
            raise UserError(f"replica {mine[0]['rank']} crashed (traceback above)")
    died = {r: c for r, c in exit_codes.items() if c is not None and c < 0}
    if died:
        rank, code = min(died.items())
        name = signal.Signals(-code).name
        raise UserError(f"replica {rank} was killed by {name} (out of memory?); the others stopped")
    if reports:
        raise UserError(
            "a replica on another machine failed first (its error is in that machine's output); "
            "the replicas here stopped"
        )
    raise UserError(f"the job failed (exit codes {exit_codes})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait(procs: list, grace: float = 10.0) -> dict[int, int | None]:
    """Wait for every process; once one fails, give the others `grace` seconds, then stop them."""
    failed_at = None
    while True:
        codes = {rank: p.exitcode for rank, p in procs}
        if all(c is not None for c in codes.values()):
            return codes
        if failed_at is None and any(c not in (None, 0) for c in codes.values()):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > grace:
            for _, p in procs:
                if p.exitcode is None:
                    p.terminate()
            for _, p in procs:
                p.join(5)
                if p.exitcode is None:
                    p.kill()
                    p.join()
            return {rank: p.exitcode for rank, p in procs}
        time.sleep(0.05)
