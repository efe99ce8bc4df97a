"""``refundguard`` command line: broker, worker, simulate, replay, demo, bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

from pydantic import ValidationError

from scorers.policy import PolicyError, load_policy
from streams import bench
from streams.broker import BrokerError, EmbeddedBroker, create_topics, free_port, wait_for_port
from streams.replay import Replayer, ReplayError, read_events, summarize, write_decisions
from streams.settings import Settings


class CliError(Exception):
    """A problem the user can fix; printed without a traceback."""


def _settings(**overrides: object) -> Settings:
    try:
        base = Settings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CliError(f"bad configuration in the environment: {problems}") from exc
    return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _check_broker(bootstrap: str) -> None:
    for server in bootstrap.split(","):
        host, _, port = server.strip().removeprefix("kafka://").rpartition(":")
        if wait_for_port(host, int(port), 3.0):
            return
    raise CliError(f"no Kafka broker answers at {bootstrap}. Start one with `refundguard broker` "
                   "or point KAFKA_BOOTSTRAP at your cluster (or use `refundguard worker --embedded-broker`).")


# ------------------------------------------------------------------ commands


def cmd_broker(args: argparse.Namespace) -> int:
    broker = EmbeddedBroker(host=args.host, port=args.port).start()
    print(f"embedded broker (Tansu, in memory) on {broker.bootstrap}; Ctrl-C stops it", flush=True)
    print(f"  export KAFKA_BOOTSTRAP={broker.bootstrap}", flush=True)
    try:
        while broker.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    broker: EmbeddedBroker | None = None
    if args.embedded_broker:
        broker = EmbeddedBroker().start()
        os.environ["KAFKA_BOOTSTRAP"] = broker.bootstrap
        print(f"embedded broker on {broker.bootstrap}", flush=True)
    settings = _settings(policy_file=args.policy, shadow_policy_file=args.shadow_policy)
    try:
        load_policy(settings.policy_file)
        if settings.shadow_policy_file:
            load_policy(settings.shadow_policy_file)
    except PolicyError as exc:
        raise CliError(str(exc)) from exc
    _check_broker(settings.bootstrap)
    import faust

    from streams.app import build, topic_names

    try:
        create_topics(settings.bootstrap, topic_names(settings), settings.topics.partitions)
    except BrokerError as exc:
        raise CliError(str(exc)) from exc
    guard = build(settings)
    worker = faust.Worker(guard.app, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if guard.pool is not None:
            guard.pool.close()
        if broker is not None:
            broker.stop()
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from streams.simulate.traffic import generate, serve_directory

    summary = generate(args.out, refunds=args.refunds, seed=args.seed, image_base=args.image_base)
    print(json.dumps(summary, indent=2))
    if args.serve:
        host, port = _host_port(args.image_base)
        server = serve_directory(args.out, host, port)
        print(f"serving {args.out} at {args.image_base}; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            server.shutdown()
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if args.policy and not args.embedded:
        raise CliError("--policy needs --embedded: a running worker decides with its own policy")
    if args.policy:
        try:
            load_policy(args.policy)
        except PolicyError as exc:
            raise CliError(str(exc)) from exc
    events = read_events(args.events)
    with contextlib.ExitStack() as stack:
        if args.embedded:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="refundguard-replay-")))
            broker = stack.enter_context(EmbeddedBroker(log_path=work / "broker.log"))
            extra = {"REFUNDGUARD_POLICY_FILE": str(args.policy.resolve())} if args.policy else {}
            stack.enter_context(_worker_process(broker.bootstrap, work, extra))
            settings = _settings(bootstrap=broker.bootstrap)
        else:
            settings = _settings()
            _check_broker(settings.bootstrap)
        replayer = Replayer(settings, timeout_s=args.timeout, window=timedelta(hours=args.window_hours))
        try:
            result = replayer.run(events)
        finally:
            replayer.close()
    write_decisions(result.decisions.values(), args.out)
    print(f"{len(result.decisions)} decisions for {result.sent_requests} refunds in {result.seconds:.1f} s "
          f"-> {args.out}; missing {len(result.missing)}; repeated {result.duplicates} "
          f"(conflicting {len(result.conflicting)})")
    for line in summarize(result.decisions.values()):
        print(line)
    if args.labels:
        from streams.backtest import figures, read_labels

        for line in figures(read_labels(args.labels), result.decisions):
            print(line)
    if result.missing:
        print("no decision within the timeout for: " + ", ".join(result.missing[:20]), file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.simulate.traffic import generate, serve_directory

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="refundguard-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    image_port = free_port()
    base = f"http://127.0.0.1:{image_port}"
    print(f"[1/4] generating {args.refunds} sample refunds with images in {work}", flush=True)
    summary = generate(work / "cases", refunds=args.refunds, seed=args.seed, image_base=base)
    server = serve_directory(work / "cases", "127.0.0.1", image_port)
    with EmbeddedBroker(log_path=work / "broker.log") as broker, \
            _worker_process(broker.bootstrap, work) as web_port:
        print(f"[2/4] embedded broker on {broker.bootstrap}; worker metrics on http://127.0.0.1:{web_port}/metrics",
              flush=True)
        print(f"[3/4] replaying {summary['refunds']} refunds", flush=True)
        os.environ["KAFKA_BOOTSTRAP"] = broker.bootstrap
        replayer = Replayer(_settings(bootstrap=broker.bootstrap), timeout_s=args.timeout)
        try:
            result = replayer.run(read_events(work / "cases" / "events.jsonl"))
        finally:
            replayer.close()
    server.shutdown()
    out = work / "decisions.jsonl"
    write_decisions(result.decisions.values(), out)
    print(f"[4/4] {len(result.decisions)} decisions for {result.sent_requests} refunds in {result.seconds:.1f} s "
          f"(missing {len(result.missing)}, conflicting {len(result.conflicting)}) -> {out}")
    for line in summarize(result.decisions.values()):
        print(line)
    labels = work / "cases" / "labels.jsonl"
    if labels.exists():
        from streams.backtest import figures, read_labels

        for line in figures(read_labels(labels), result.decisions):
            print(line)
    return 0 if not result.missing else 2


@contextlib.contextmanager
def _worker_process(bootstrap: str, work: Path, extra_env: dict[str, str] | None = None) -> Iterator[int]:
    web_port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": bootstrap,
        "REFUNDGUARD_WEB_PORT": str(web_port),
        "REFUNDGUARD_DATA_DIR": str(work / "state"),
        "REFUNDGUARD_FETCH_ALLOW_PRIVATE": "true",
        "REFUNDGUARD_LOG_FORMAT": "json",
        **(extra_env or {}),
    }
    log = (work / "worker.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(web_port, process, work / "worker.log", 120.0)
        yield web_port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_ready(web_port: int, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{web_port}/health/ready"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise CliError(f"the worker exited with code {process.returncode}; its log ends with:\n{tail}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.3)
    raise CliError(f"the worker was not ready within {timeout_s:g} s; see {log_path}")


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


# ------------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refundguard", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (in memory)")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=9092)
    b.set_defaults(func=cmd_broker)

    w = sub.add_parser("worker", help="run the Faust worker against KAFKA_BOOTSTRAP")
    w.add_argument("--embedded-broker", action="store_true", help="start an embedded broker first")
    w.add_argument("--policy", type=Path, help="policy TOML (default: REFUNDGUARD_POLICY_FILE or built-in)")
    w.add_argument("--shadow-policy", type=Path, help="also publish this policy's decisions to the shadow topic")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("simulate", help="generate sample refund traffic (events + images)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--refunds", type=int, default=60)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--image-base", default="http://127.0.0.1:8765")
    s.add_argument("--serve", action="store_true", help="serve the images at --image-base until Ctrl-C")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("replay", help="produce an events file in order and collect the decisions")
    r.add_argument("events", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each window's decisions")
    r.add_argument("--window-hours", type=float, default=1.0,
                   help="requests within this much event time are sent together (0: one at a time)")
    r.add_argument("--embedded", action="store_true",
                   help="start an embedded broker and a worker for this replay (fresh state)")
    r.add_argument("--policy", type=Path, help="with --embedded: the policy file the worker decides with")
    r.add_argument("--labels", type=Path, help="labels.jsonl of the events: print catch and false-hold figures")
    r.set_defaults(func=cmd_replay)

    d = sub.add_parser("demo", help="broker + worker + sample traffic + replay, then a summary")
    d.add_argument("--refunds", type=int, default=60)
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--workdir", type=Path)
    d.add_argument("--timeout", type=float, default=120.0)
    d.set_defaults(func=cmd_demo)

    bench.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CliError, ReplayError, BrokerError, PolicyError) as exc:
        print(f"refundguard: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
