"""The `lbsim` command line: run a scenario, compare policies, re-render saved results, list and check scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from lb.policies import POLICY_TYPES, PRESETS, BuiltinPolicy, PolicyError
from scenarios.compare import (
    CompareRunner,
    Job,
    JobResult,
    PolicyChoice,
    RunRecord,
    child_argv,
    compare_document,
    import_policy,
    resolve_policy,
    slugs,
    versus_lines,
    write_compare_csv,
)
from scenarios.ports import (
    LOOPBACK,
    BindError,
    ListenError,
    PortClaim,
    PortError,
    bind_warning,
    check_free,
    claim_ports,
    parse_bind,
    unavailable,
)
from scenarios.report import ReportError, compare_table, is_compare_dir, is_run_dir, plot_compare, plot_run, read_json
from scenarios.runner import ScenarioRun
from scenarios.sampler import Progress as RunProgress
from scenarios.schema import Scenario, ScenarioError, builtin_names, load_scenario
from scenarios.serve import DEFAULT_PORTS, plan_ports, serve, serving_scenario
from worlds.base import World
from worlds.real import RealWorld


def _tidy_params(params: list[Any]) -> list[Any]:
    """Help that shows what to type: a flag takes no value, so none is shown (typer 0.29 prints `<bool>` beside
    every flag, --help too), and an argument's metavar already names what it takes (no `<str>` beside it)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "param_type_name", "") == "argument" and hasattr(param, "display_type_rich"):
            param.display_type_rich = _no_type
    return params


def _no_type(ctx: Any) -> None:
    return None


def _tidy_usage(pieces: list[str]) -> list[str]:
    """A required argument is written bare in the usage line (`SCENARIO`), not braced (`{SCENARIO}`)."""
    return [p[1:-1] if len(p) > 2 and p[0] == "{" and p[-1] == "}" else p for p in pieces]


class LbsimCommand(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_params(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _tidy_usage(super().collect_usage_pieces(ctx))


class LbsimGroup(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy_params(super().get_params(ctx))


app = typer.Typer(
    cls=LbsimGroup,
    add_completion=False,
    no_args_is_help=True,
    help="lbsim: reproduce load-balancer health-check cascades on loopback and compare protections.",
)
console = Console(stderr=True)
out = Console()

T = TypeVar("T")


class LoopKind(StrEnum):
    uvloop = "uvloop"
    asyncio = "asyncio"


LOOP_METAVAR = "|".join(LoopKind)


class WorldKind(StrEnum):
    real = "real"
    sim = "sim"


WORLD_METAVAR = "|".join(WorldKind)
WORLD_HELP = ("real: loopback sockets and wall time x --speed (the default: real sockets, as the design promises); "
              "sim: virtual time and an in-memory network, deterministic for a seed and as fast as the CPU allows.")


async def until_signalled(body: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run `body(stop)` with SIGINT and SIGTERM wired to it: the first signal sets `stop` (a clean stop that keeps
    results); a second one, if that stop is stuck, cancels the body."""
    stop = asyncio.Event()
    loop_ = asyncio.get_running_loop()
    me = asyncio.current_task()

    def on_signal() -> None:
        if stop.is_set() and me is not None:
            me.cancel()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop_.add_signal_handler(sig, on_signal)
    try:
        return await body(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop_.remove_signal_handler(sig)


def real_world(speed: float, seed: int, loop: LoopKind) -> RealWorld:
    """The world a run from the command line runs in: wall time x `speed` on loopback, on the `loop` asked for."""
    world = RealWorld(speed=speed, seed=seed, loop=loop.value)
    if world.loop_kind != loop.value:
        console.print("[yellow]uvloop is not installed here; using the asyncio loop[/]")
    return world


def make_world(kind: WorldKind, sc: Scenario, *, speed: float | None, seed: int | None, loop: LoopKind | None,
               fixed_ports: Mapping[str, int]) -> World:
    """The world `--world` asks for. Options that only mean something in the real world are refused in the
    simulated one rather than ignored: its clock has no speed, its loop is its own and its listeners are in memory,
    out of reach of anything outside the run."""
    seed = seed if seed is not None else sc.seed
    if kind is WorldKind.real:
        return real_world(speed if speed is not None else sc.speed, seed, loop or LoopKind.uvloop)
    given = [name for name, value in (("--speed", speed), ("--loop", loop)) if value is not None]
    given += [option for option, port in fixed_ports.items() if port]
    if given:
        raise ScenarioError(f"{', '.join(given)} only apply to --world real: a sim run has no wall clock to scale, "
                            "runs on its own event loop and listens only inside the simulated network")
    from worlds.sim import SimWorld

    return SimWorld(seed=seed)


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


SUMMARY_ROWS = [
    ("availability", "availability", "{:.4f}"),
    ("worst_minute_availability", "worst sim-minute availability", "{:.4f}"),
    ("requests_total", "requests", "{}"),
    ("requests_failed", "failed requests", "{}"),
    ("latency_p99_s", "p99 latency (sim s)", "{:.4f}"),
    ("min_routable_fraction", "lowest routable share", "{:.3f}"),
    ("capacity_lost_target_seconds", "capacity lost (target-s)", "{:.1f}"),
    ("false_ejection_target_seconds", "false ejections (target-s)", "{:.1f}"),
    ("missed_ejection_target_seconds", "missed ejections (target-s)", "{:.1f}"),
    ("ejections", "ejections", "{}"),
    ("flaps", "flaps", "{}"),
    ("dns_failovers", "DNS failovers", "{}"),
    ("withheld_by_reason", "removals withheld, by reason", "{}"),
    ("time_to_detect_s", "time to detect a failure (sim s)", "{:.1f}"),
    ("time_to_recover_s", "time to recover (sim s)", "{:.1f}"),
    ("fail_open_zone_seconds", "fail-open (zone-s)", "{:.0f}"),
    ("panic_zone_seconds", "panic (zone-s)", "{:.0f}"),
    ("checker_lateness_p99_s", "checker lateness p99 (sim s)", "{:.4f}"),
    ("loop_lag_p99_s", "event-loop lag p99 (sim s)", "{:.4f}"),
]


def summary_table(summary: dict[str, Any]) -> Table:
    title = f"{summary['scenario']} / {summary['policy']} / seed {summary['seed']}"
    if not summary["complete"]:
        title += " (INCOMPLETE)"
    table = Table(title=escape(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in SUMMARY_ROWS:
        v = summary.get(key)
        if isinstance(v, dict):  # counts by name: the non-zero ones
            table.add_row(label, escape(", ".join(f"{k} {n}" for k, n in v.items() if n) or "0"))
            continue
        table.add_row(label, "-" if v is None else fmt.format(v))
    return table


# Two runs at once on two or more cores: each needs about half a core, and more would make them late.
DEFAULT_JOBS = min(2, os.cpu_count() or 1)

SET_OPTION = typer.Option(
    "--set", metavar="KEY=VALUE",
    help="Override a scenario field before validation, KEY=VALUE with a dotted KEY and a YAML VALUE, "
         "e.g. --set control_plane.dns.protections.cas=true; repeatable.")


def stages_table(summary: dict[str, Any]) -> Table | None:
    """The cascade's stages as a timeline, if the run found any."""
    stages = summary.get("stages") or []
    if not stages:
        return None
    table = Table(title="stages (detected from the recorded metrics)")
    table.add_column("stage")
    table.add_column("from (sim s)", justify="right")
    table.add_column("to (sim s)", justify="right")
    table.add_column("lasted (sim s)", justify="right")
    for st in stages:
        table.add_row(escape(st["name"]), f"{st['start_s']:.0f}", f"{st['end_s']:.0f}",
                      f"{st['end_s'] - st['start_s']:.0f}")
    return table


@app.command(cls=LbsimCommand)
def run(
    scenario: Annotated[str, typer.Argument(metavar="SCENARIO", help="A built-in scenario name or a YAML file.")],
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", "-p", metavar="SPEC",
                     help="Policy name, preset or spec like 'fail-open+dns-failover'; repeat to compose. Default: the "
                          "scenario's own."),
    ] = None,
    speed: Annotated[float | None, typer.Option(metavar="X", help="Sim seconds per wall second.", min=0.001)] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Random seed (default: the scenario's).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="DIR",
                                                 help="Run directory (default: runs/NAME-TIME).")] = None,
    metrics_port: Annotated[int, typer.Option(metavar="PORT", help="Loopback port for /metrics; 0 picks a free one.",
                                              min=0, max=65535)] = 0,
    admin_port: Annotated[int, typer.Option(metavar="PORT",
                                            help="Loopback port of the backends' admin API; 0 picks a free one.",
                                            min=0, max=65535)] = 0,
    loop: Annotated[LoopKind | None, typer.Option(metavar=LOOP_METAVAR,
                                                  help="Event loop of a real run [default: uvloop].")] = None,
    world_kind: Annotated[WorldKind, typer.Option("--world", metavar=WORLD_METAVAR, help=WORLD_HELP)] = WorldKind.real,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    overrides: Annotated[list[str] | None, SET_OPTION] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into an --out directory that is not empty.")] = False,
    import_policies: Annotated[
        list[str] | None,
        # Hidden: how `lbsim compare --allow-import` hands a user's policy class to its child runs.
        typer.Option("--import-policy", metavar="MODULE:CLASS", hidden=True,
                     help="Import and register module.path:ClassName first."),
    ] = None,
) -> None:
    """Run one scenario with one policy list and write DIR/summary.json."""
    try:
        for path in import_policies or []:
            import_policy(path)
        sc, source = load_scenario(scenario, overrides)
        for note in sc.health_check.aws_notes():
            console.print(f"[yellow]note:[/] {escape(source)}: health_check.{escape(note)} "
                          "(fine for a compressed scenario)",
                          soft_wrap=True)
        world = make_world(world_kind, sc, speed=speed, seed=seed, loop=loop,
                           fixed_ports={"--metrics-port": metrics_port, "--admin-port": admin_port})
        r = ScenarioRun(sc, list(policy) if policy else None, world=world, source=source,
                        metrics_port=metrics_port, admin_port=admin_port,
                        on_started=print_ports if world.name == "real" else None)
        listeners = {"metrics": PortClaim("--metrics-port", "/metrics", LOOPBACK, metrics_port),
                     "admin": PortClaim("--admin-port", "backends admin API", LOOPBACK, admin_port)}
        # Before the run directory exists: a taken port must not leave an empty run behind.
        check_free(claim_ports(listeners.values()))
    except (ScenarioError, PolicyError, PortError) as e:
        raise _fail(str(e)) from None
    target = out_dir or Path("runs") / f"{sc.name}-{datetime.now():%Y%m%d-%H%M%S}"
    check_run_dir(target, force)
    try:
        summary = run_with_progress(r, quiet)
    except ScenarioError as e:
        r.write(target, r.summary())  # what was recorded up to the failing event is kept
        raise _fail(f"{e} (partial results in {target})") from None
    except OSError as e:
        # A port taken since check_free, or no socket to be had: the directory exists, so it says what happened.
        r.write(target, r.summary())
        raise _fail(f"{start_failure(e, listeners)} (partial results in {target})") from None
    r.write(target, summary)
    plot_run(target)  # run.png: routable targets and request success over sim time, events marked
    info = r.run_info()
    out.print(summary_table({**summary, **info}))
    stages = stages_table(summary)
    if stages is not None:
        out.print(stages)
    if not info["fidelity_ok"]:
        console.print(
            f"[yellow]warning:[/] the event loop lagged {info['loop_lag_p99_s']:.3g} sim s (p99), more than a "
            "tenth of the shortest timeout: this machine cannot keep up at this speed, so some timeouts are the "
            "simulator's own. Lower --speed for faithful results.",
            soft_wrap=True,
        )
    out.print(f"run directory: {escape(str(target))}", soft_wrap=True)
    if not summary["complete"]:
        raise typer.Exit(130)


def check_run_dir(target: Path, force: bool) -> None:
    """Before anything starts: the run directory must be new or empty (unless --force) and writable, so a run
    never overwrites earlier results by accident nor finds out at the end that it cannot keep its own."""
    if target.is_dir() and any(target.iterdir()) and not force:
        raise _fail(f"{target} exists and is not empty; use --force to write into it, or choose another --out")
    probe = target / ".lbsim-write-check"
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise _fail(f"cannot write the run directory {target}: {e.strerror or e}; choose another --out") from None


def start_failure(e: OSError, listeners: Mapping[str, PortClaim], hint: str = "") -> str:
    """What to say when a run could not start: a listener that lost its fixed port is named as `check_free` would
    name it (`listeners` maps `ListenError.listener` keys to claims); anything else is `could not start` + `hint`."""
    if isinstance(e, ListenError):
        claim = listeners.get(e.listener)
        if claim is not None and claim.port:
            return str(unavailable(claim, e.error))
    return f"could not start: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "") + hint


def print_ports(ports: dict[str, Any]) -> None:
    nodes = "  ".join(f"{zone}={addr}" for zone, addr in ports.get("nodes", {}).items())
    console.print(f"metrics: http://127.0.0.1:{ports['metrics']}/metrics", highlight=False, soft_wrap=True)
    console.print(f"admin API: http://127.0.0.1:{ports['admin']}/targets", highlight=False, soft_wrap=True)
    console.print(f"load balancer nodes: {nodes}", highlight=False, soft_wrap=True)
    if "dns" in ports:
        console.print(f"control-plane DNS: 127.0.0.1:{ports['dns']} (try: dig @127.0.0.1 -p {ports['dns']} "
                      "lb.lbsim or leasestore.cp.lbsim)", highlight=False, soft_wrap=True)


def run_with_progress(r: ScenarioRun, quiet: bool) -> dict[str, Any]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("sim {task.completed:>7.0f}/{task.total:.0f} s"),
        TextColumn("{task.fields[gauges]}"),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
    )
    task = progress.add_task(escape(f"{r.scenario.name} [{r.policy_name}]"), total=r.scenario.duration_s, gauges="")

    def on_progress(p: RunProgress) -> None:
        gauges = (f"serving {p.serving}/{p.registered}  zones in DNS {p.zones_in_dns}  "
                  f"requests {p.requests} failed {p.failed}")
        progress.update(task, completed=p.sim_time, gauges=gauges)

    r.on_progress = on_progress

    async def main() -> dict[str, Any]:
        if r.on_progress is not None and not quiet:
            where = f"at speed {r.speed:g}" if r.speed is not None else "in the sim world"
            console.print(f"starting {escape(r.scenario.name)} {where} (Ctrl-C stops and keeps results)")
        return await until_signalled(r.run)

    with progress:
        try:
            return r.world.run(main())
        except asyncio.CancelledError:
            console.print("stopped by a second signal; writing what was recorded")
            return r.summary()


def _port_option(help_text: str) -> Any:
    return typer.Option(metavar="PORT", help=help_text + " 0 picks a free one.", min=0, max=65535)


@app.command("serve", cls=LbsimCommand)
def serve_command(
    scenario: Annotated[str, typer.Argument(metavar="SCENARIO",
                                            help="A built-in scenario name or a YAML file.")] = "zone-outage",
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", "-p", metavar="SPEC",
                     help="Policy name, preset or spec, as for `lbsim run`; repeat to compose. Default: the "
                          "scenario's own."),
    ] = None,
    speed: Annotated[float, typer.Option(metavar="X", help="Sim seconds per wall second (1: real time).",
                                         min=0.001)] = 1.0,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Random seed (default: the scenario's).")] = None,
    overrides: Annotated[list[str] | None, SET_OPTION] = None,
    metrics_port: Annotated[int, _port_option("Port of /metrics (on --bind), what Prometheus scrapes.")
                            ] = DEFAULT_PORTS["metrics"],
    admin_port: Annotated[int, _port_option("Port of the serve admin API (on --bind; POST /events, GET /state).")
                          ] = DEFAULT_PORTS["admin"],
    dns_port: Annotated[int, _port_option("UDP port of the control plane's DNS server (only with a control plane).")
                        ] = DEFAULT_PORTS["dns"],
    node_port: Annotated[int, _port_option(
        "Port of the load balancer's zone nodes: with a control plane all share it, each on its own address "
        "127.0.1.N; without one they take this port, +1, +2 ... in zone order, on --bind.")] = DEFAULT_PORTS["node"],
    targets_port: Annotated[int, _port_option("Loopback port of the backends' admin API (/targets).")] = 0,
    bind: Annotated[str, typer.Option(
        "--bind", metavar="HOST",
        help="IP address (a literal, not a name) where /metrics, the serve admin API and, without a control plane, "
             "the zone nodes listen; 0.0.0.0 or :: for every interface. With a control plane the zone nodes keep "
             "their 127.0.1.N addresses and its DNS server 127.0.0.1; the backends, their admin API "
             "(--targets-port, no token) and the control plane always stay on 127.0.0.1. An address outside "
             "127.0.0.0/8 and ::1 is reachable from the network: a warning, and use --admin-token.")] = LOOPBACK,
    admin_token: Annotated[
        str | None,
        typer.Option(metavar="TOKEN", envvar="LBSIM_ADMIN_TOKEN", show_envvar=True,
                     help="Require `Authorization: Bearer TOKEN` on the serve admin API (the environment variable "
                          "keeps it out of the process list)."),
    ] = None,
    record: Annotated[
        bool | None,
        typer.Option("--record/--no-record", help="Keep the recorder's time series and every request and sample for "
                                                  "--out (memory and disk grow with time). Default: only with --out."),
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="DIR",
                                                 help="Write the run directory here on exit.")] = None,
    loop: Annotated[LoopKind, typer.Option(metavar=LOOP_METAVAR, help="Event loop implementation.")] = LoopKind.uvloop,
) -> None:
    """Start the whole system on fixed ports (loopback unless --bind) and keep it running until Ctrl-C or SIGTERM.

    The scenario's timeline plays at its times, then everything keeps running (up to 7 sim days).

    Point Prometheus at the metrics port (deploy/prometheus.yml); inject timeline events through the admin API:

    curl -d '{"zone": "a", "path": {"state": "blackhole"}}' http://127.0.0.1:9465/events
    """
    try:
        host = parse_bind(bind)
        warning = bind_warning(host, token=admin_token is not None)
        if warning is not None:
            console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        sc, source = load_scenario(scenario, overrides)
        served = serving_scenario(sc)
        claims = plan_ports(served, metrics=metrics_port, admin=admin_port, dns=dns_port, node=node_port,
                            targets=targets_port, host=host)
        keep = record if record is not None else out_dir is not None
        world = real_world(speed, seed if seed is not None else served.seed, loop)
        r = ScenarioRun(served, list(policy) if policy else None, world=world, source=source,
                        metrics_port=metrics_port, admin_port=targets_port,
                        ports={"dns": dns_port, "node": node_port}, record=keep, bind=host)
        check_free(claims)
    except (ScenarioError, PolicyError, PortError, BindError) as e:
        raise _fail(str(e)) from None
    # The run's listener keys (ListenError.listener), by the option that fixes each port.
    by_option = {c.option: c for c in claims}
    listeners = {key: by_option[option] for key, option in (
        ("metrics", "--metrics-port"), ("serve-admin", "--admin-port"), ("admin", "--targets-port"))
        if option in by_option}

    def on_ready(rows: list[tuple[str, str]]) -> None:
        table = Table(title=escape(f"lbsim serve: {sc.name} [{r.policy_name}] at speed {r.speed:g} "
                                   "(Ctrl-C stops)"))
        table.add_column("listener", no_wrap=True)
        table.add_column("address", no_wrap=True)
        for what, address in rows:
            table.add_row(escape(what), escape(address))
        # Wide enough for the addresses whatever the terminal: a cut-off address is no use to copy.
        Console(width=max(out.width, 120), file=sys.stdout).print(table, highlight=False)

    async def main() -> dict[str, Any]:
        return await until_signalled(
            lambda stop: serve(r, stop, admin_port=admin_port, token=admin_token, on_ready=on_ready))

    failure: str | None = None
    try:
        summary = r.world.run(main())
    except asyncio.CancelledError:
        console.print("stopped by a second signal")
        summary = r.summary()
    except ScenarioError as e:
        summary, failure = r.summary(), str(e)
    except OSError as e:
        raise _fail(start_failure(e, listeners, "; if a port is taken, choose others with --metrics-port, "
                                                "--admin-port, --dns-port, --node-port or --targets-port (0 picks a "
                                                "free one)")) from None
    if out_dir is not None:
        r.write(out_dir, summary)
        console.print(f"run directory: {escape(str(out_dir))}", soft_wrap=True, highlight=False)
    if failure is not None:
        raise _fail(failure)
    console.print(f"stopped at sim time {summary['duration_s']:.0f} s: {summary.get('requests_total', 0)} requests, "
                  f"{summary.get('requests_failed', 0)} failed", highlight=False)


scenarios_app = typer.Typer(cls=LbsimGroup, no_args_is_help=False,
                            help="The built-in scenarios: list them, show one, or print the file format's schema.")
app.add_typer(scenarios_app, name="scenarios")


@scenarios_app.callback(invoke_without_command=True)
def scenarios_main(ctx: typer.Context) -> None:
    """List the built-in scenarios (same as `lbsim scenarios list`)."""
    if ctx.invoked_subcommand is None:
        list_scenarios()


@scenarios_app.command("list", cls=LbsimCommand)
def list_scenarios() -> None:
    """List the built-in scenarios and what each teaches."""
    table = Table(title="built-in scenarios")
    table.add_column("name", no_wrap=True)  # a name is what one types next: never split it
    table.add_column("what it teaches")
    table.add_column("should beat naive on")
    for name in builtin_names():
        sc, _ = load_scenario(name)
        text = " ".join(sc.description.split())
        wins = f"{sc.headline}: {', '.join(sc.should_win)}" if sc.should_win else "-"
        table.add_row(name, text.split(". ")[0].rstrip(".") + ".", wins)
    out.print(table)


@scenarios_app.command("show", cls=LbsimCommand)
def show_scenario(name: Annotated[str, typer.Argument(metavar="NAME", help="A built-in scenario name.")]) -> None:
    """Print a built-in scenario's file, to read or to copy and edit."""
    if name not in builtin_names():
        raise _fail(f"{name!r} is not a built-in scenario (built-ins: {', '.join(builtin_names())})")
    # Written as is, not through rich: a terminal-width wrap would change the file.
    typer.echo(resources.files("scenarios.library").joinpath(f"{name}.yaml").read_text(), nl=False)


@scenarios_app.command("schema", cls=LbsimCommand)
def scenario_schema() -> None:
    """Print the JSON Schema of the scenario format (for editors: yaml-language-server and the like)."""
    out.print_json(json.dumps(Scenario.model_json_schema(by_alias=True)))


@app.command(cls=LbsimCommand)
def policies() -> None:
    """List the built-in policies (parameters with defaults, origin) and presets."""
    table = Table(title="policies")
    table.add_column("name")
    table.add_column("what it does")
    table.add_column("parameters (defaults)")
    table.add_column("origin")
    for name, cls in sorted(POLICY_TYPES.items()):
        defaults = ", ".join(f"{k}={_fmt_default(v)}" for k, v in cls().params().items()) if issubclass(
            cls, BuiltinPolicy) else ""
        table.add_row(name, escape((cls.__doc__ or "").strip().split("\n")[0]), escape(defaults), escape(cls.origin))
    for name, spec in sorted(PRESETS.items()):
        table.add_row(f"{name} (preset)", spec, "", "")
    out.print(table)


def _fmt_default(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, frozenset | set | list | tuple):
        return "[" + ",".join(sorted(str(v) for v in value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


@app.command(cls=LbsimCommand)
def validate(
    scenario: Annotated[str, typer.Argument(metavar="SCENARIO", help="A built-in scenario name or a YAML file.")],
    overrides: Annotated[list[str] | None, SET_OPTION] = None,
) -> None:
    """Check a scenario file and print it resolved with defaults."""
    try:
        sc, source = load_scenario(scenario, overrides)
        ScenarioRun(sc, source=source)
    except (ScenarioError, PolicyError) as e:
        raise _fail(str(e)) from None
    for note in sc.health_check.aws_notes():
        console.print(f"[yellow]note:[/] {escape(source)}: health_check.{escape(note)}", soft_wrap=True)
    out.print_json(json.dumps(sc.model_dump(mode="json", by_alias=True)))


def print_compare(doc: dict[str, Any]) -> None:
    out.print(compare_table(doc))
    lines = versus_lines(doc)
    if lines:
        out.print(f"versus {escape(next(iter(doc['policies'])))} (the first policy, means):", highlight=False)
        for line in lines:
            out.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


@app.command(cls=LbsimCommand)
def compare(
    scenario: Annotated[str, typer.Argument(metavar="SCENARIO", help="A built-in scenario name or a YAML file.")],
    policy: Annotated[
        list[str],
        typer.Option("--policy", "-p", metavar="SPEC",
                     help="A policy to compare, repeatable; the first is the baseline. A spec ('naive', "
                          "'aws-velocity', 'scenario+velocity'), a YAML file of policy entries, or "
                          "module.path:ClassName (needs --allow-import)."),
    ],
    seeds: Annotated[int, typer.Option(metavar="N", help="Runs per policy, on seeds S, S+1, ... S+N-1.", min=1)] = 1,
    seed: Annotated[int | None, typer.Option(metavar="S", help="First seed S (default: the scenario's).")] = None,
    speed: Annotated[float | None, typer.Option(metavar="X", help="Sim seconds per wall second.", min=0.001)] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", metavar="DIR",
                                                 help="Compare directory (default: runs/compare-NAME-TIME).")] = None,
    jobs: Annotated[int, typer.Option(
        metavar="N",
        help="Runs at a time, each its own process with its own ports (default: 2, or 1 on a 1-core machine; "
             "a run uses about half a core at its default speed).", min=1)] = DEFAULT_JOBS,
    overrides: Annotated[list[str] | None, SET_OPTION] = None,
    loop: Annotated[LoopKind | None, typer.Option(metavar=LOOP_METAVAR,
                                                  help="Event loop of real runs [default: uvloop].")] = None,
    world_kind: Annotated[WorldKind, typer.Option("--world", metavar=WORLD_METAVAR, help=WORLD_HELP)] = WorldKind.real,
    allow_import: Annotated[
        bool,
        typer.Option("--allow-import", help="Allow --policy module.path:ClassName. This imports, and so RUNS, that "
                                            "module's code, here and in every run: only for code you trust."),
    ] = False,
) -> None:
    """Run a scenario once per policy and seed, then compare: DIR/compare.json, compare.csv, compare.png."""
    try:
        sc, source = load_scenario(scenario, overrides)
        choices: list[PolicyChoice] = [resolve_policy(p, allow_import=allow_import) for p in policy]
        make_world(world_kind, sc, speed=speed, seed=seed, loop=loop, fixed_ports={})  # refuses what a child would
        for c in choices:
            ScenarioRun(sc, [c.spec], source=source)  # the child's own checks, before anything runs
    except (ScenarioError, PolicyError) as e:
        raise _fail(str(e)) from None
    labels = [c.label for c in choices]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise _fail(f"policy {', '.join(twice)} given more than once")
    first = seed if seed is not None else sc.seed
    seed_list = list(range(first, first + seeds))
    target = out_dir or Path("runs") / f"compare-{sc.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if (target / "compare.json").exists() or (target / "runs").exists():
        raise _fail(f"{target} already holds a compare; choose another --out")
    slug = slugs(labels)
    job_list = [Job(c, s, target / "runs" / f"{slug[c.label]}-seed{s}") for s in seed_list for c in choices]
    finished = 0

    def on_done(r: JobResult) -> None:
        nonlocal finished
        finished += 1
        name = escape(f"[{finished}/{len(job_list)}] {r.job.policy.label} seed {r.job.seed}")
        if r.failed:
            tail = "\n".join(r.stderr_tail.strip().splitlines()[-15:])
            console.print(f"[red]failed[/] {name}: {r.how_it_ended()} after {r.wall_s:.1f} s; its stderr "
                          f"ends with:\n{escape(tail)}", highlight=False, soft_wrap=True)
        elif r.summary is None:
            console.print(f"[yellow]stopped[/] {name}: no results written ({r.wall_s:.1f} s wall)", highlight=False)
        else:
            note = "" if r.summary.get("complete") else " [yellow](interrupted)[/]"
            console.print(f"[green]done[/] {name}: availability {r.summary.get('availability', 0.0):.4f}, "
                          f"{r.wall_s:.1f} s wall{note}", highlight=False)

    runner = CompareRunner(
        job_list,
        lambda j: child_argv(j, scenario, speed=speed, overrides=overrides or [], loop=loop and loop.value,
                             world=world_kind.value),
        parallel=jobs, on_done=on_done,
    )

    async def main() -> list[JobResult]:
        loop_ = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop_.add_signal_handler(sig, runner.interrupt)
        try:
            return await runner.run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop_.remove_signal_handler(sig)

    console.print(f"comparing {len(choices)} policies x {len(seed_list)} seed{'s' * (len(seed_list) != 1)} on "
                  f"{escape(sc.name)}: "
                  f"{len(job_list)} runs, {jobs} at a time (Ctrl-C stops and keeps results)", highlight=False)
    results = asyncio.run(main())
    records = [RunRecord(r.job.policy.label, r.job.seed, r.job.dir.relative_to(target).as_posix(), r.summary)
               for r in results if r.summary is not None and not r.failed]
    complete = not runner.stopped and all(
        r.returncode == 0 and r.summary is not None and r.summary.get("complete") for r in results)
    doc = compare_document(sc.name, seed_list, complete, labels, records, world_kind.value)
    target.mkdir(parents=True, exist_ok=True)
    (target / "compare.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_compare_csv(doc, target / "compare.csv")
    print_compare(doc)
    plot_compare(target, doc)
    out.print(f"compare directory: {escape(str(target))}", soft_wrap=True, highlight=False)
    if runner.stopped:
        raise typer.Exit(130)
    if any(r.failed for r in results):
        raise _fail("some runs failed (see above); compare.json has the others", code=1)


@app.command(cls=LbsimCommand)
def report(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A run directory (has summary.json) or a compare "
                                                                 "directory (has compare.json).")],
) -> None:
    """Re-render the tables and the plot of a saved run or compare, without running anything."""
    if not (is_compare_dir(directory) or is_run_dir(directory)):
        raise _fail(f"{directory} is neither a run directory (no summary.json) nor a compare directory "
                    "(no compare.json)")
    try:
        if is_compare_dir(directory):
            doc = read_json(directory / "compare.json")
            print_compare(doc)
            png = plot_compare(directory, doc)
        else:
            summary = read_json(directory / "summary.json")
            # A run directory written before run.json existed has the loop lag in summary.json.
            info = read_json(directory / "run.json") if (directory / "run.json").is_file() else {}
            out.print(summary_table({**summary, **info}))
            stages = stages_table(summary)
            if stages is not None:
                out.print(stages)
            png = plot_run(directory)
    except (ReportError, KeyError, TypeError, ValueError) as e:
        raise _fail(f"{directory}: cannot re-render it: {e!r}" if not isinstance(e, ReportError) else str(e)) from None
    out.print(f"plot: {escape(str(png))}", soft_wrap=True, highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
