"""The README's commands, run as a user runs them: every fenced shell block (```sh, bash, shell, console) and SQL
block, in README order, against a stack this test starts with `jetscribe up --model null` in a scratch folder that
holds this checkout's `.venv` and `bench` (as a clone does). A block that grows in the README is run without anyone
touching this file; a block that cannot run here says why, with a marker.

Markers: an HTML comment (invisible on GitHub) on the lines just before a block's opening fence, one or more:

    <!-- doc-test: skip REASON -->             not run; the reason is required (needs the nats CLI, a GPU, ...)
    <!-- doc-test: covered-by PATH::TEST -->   run by that test instead (it must exist); say so when a block needs
                                               something this test does not start (a cluster, credentials, ...)
    <!-- doc-test: shorten ARGS -->            a benchmark: each command runs with ARGS appended (argparse takes the
                                               last of a repeated option), on its own stack, in
                                               `test_benchmark_block_runs_shortened`
    <!-- doc-test: live-session TENANT/ID -->  before the block, `jetscribe stream` sends the speech sample as that
                                               session in real time (TRANSCRIPTS first holds 1234 messages, so that
                                               `--from-seq 1234` lands in it); after it, the stream must exit 0
    <!-- doc-test: files NAME[:CHANNELS] ... -> the audio files the block reads: the first CLIP_S seconds of the
                                               speech sample, written under those names (CHANNELS copies of it)

How a block runs (`test_readme_blocks_run_against_a_running_stack`): line by line (a trailing `\\` continues it),
each command with `bash -o pipefail` and JETSCRIBE_MODEL=null, NATS_URL and DATABASE_URL unset (the CLI finds the
stack through `.jetscribe/stack.json`); it must exit 0 within COMMAND_TIMEOUT_S. A command ending in `&` runs in one
shell with the next one, which then waits for it; it must exit 0 too. A command whose comment says `Ctrl-C` is live:
it runs on a terminal (a pty) until it has drawn something, LIVE_S seconds more, then gets SIGINT and must exit 0.
`jetscribe up` (without `-d`) is started in the background and becomes the stack (the one before is stopped); a
stack that a block stopped (`jetscribe down`) is started again before the next block. `PORT` is the metrics port of
the worker that served the live session. Where a command's comment shows a JSON object, its output must be one with
those keys; `jetscribe follow` of the live session must print its finals and end at its `ended`. SQL blocks run on
the stack's PostgreSQL. Then the CLI table's commands that no block holds (TABLE_COMMANDS) run the same way; of the
others, `jetscribe up` is the stack this test starts and `jetscribe stream` sends the live session.

Commands of the README run by other tests, not here:
- `make run` and `jetscribe demo` (what `make run` runs once `.venv` exists):
  tests/e2e/test_pipeline.py::test_demo_command_prints_the_transcript
- `make test`: the suite this test belongs to.
- `bench/load.py ...`: tests/integration/test_load_bench.py (its runner, two sessions), tests/unit/bench/test_load.py.
- `nats ...` (natscli is not installable here): the same views through `jetscribe follow` (here and
  tests/integration/test_follow.py), `jetscribe status` (here and tests/integration/test_status_cli.py) and
  `jetscribe sessions` (here); the micro-service endpoints `nats micro` reads: tests/integration/test_discovery.py.
- the GPU command of the load benchmark: needs a GPU.
- the authentication block (`jetscribe up &`, `tenant add`, `stream`/`follow` with a tenant's seed, `tenant revoke`):
  tests/integration/test_auth.py (a tenant streams and follows with its own credentials; a revoked tenant is cut
  off at the reload) and tests/unit/test_nats_config.py (`tenant add`); `jetscribe tenant list` by no test yet.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).parents[2]
README = REPO / "README.md"
SHELL = ("sh", "bash", "shell", "console")
COMMAND_TIMEOUT_S = 180.0
LIVE_S = 2.0  # a live command runs this long after its first output, then gets Ctrl-C
PADDED_TO_SEQ = 1234
DIRECTIVES = ("skip", "covered-by", "shorten", "live-session", "files")
CLIP_S = 12.0  # seconds of the speech sample in the files a block reads
# The CLI table's commands (README "The CLI") that no block shows, with the live session's names.
TABLE_COMMANDS = [
    "jetscribe transcript s1 --tenant acme --format srt",
    "jetscribe transcript s1 --tenant acme --format json",
    "jetscribe sessions --tenant acme",
    "jetscribe status --once",
    "jetscribe db upgrade",
]


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    directives: list[tuple[str, str]] = field(default_factory=list)

    def directive(self, name: str) -> str | None:
        return next((arg for key, arg in self.directives if key == name), None)

    @property
    def commands(self) -> list[str]:
        """Its command lines, a trailing backslash joining the next; blank and comment-only lines left out."""
        commands, current = [], ""
        for raw in self.text.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                current += line[:-1].strip() + " "
                continue
            line = current + line.strip()
            current = ""
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
        return commands

    @property
    def steps(self) -> list[str]:
        """`commands`, those sent to the background (`cmd &`) joined to the next into one shell script that waits
        for them and fails if one failed."""
        steps, background = [], []
        for command in self.commands:
            code = command.split(" #", 1)[0].strip()
            if code.endswith("&") and code.split()[:2] == ["jetscribe", "up"]:
                steps.append(code[:-1].strip())  # the stack, started in the background by the harness
                continue
            if code.endswith("&"):
                background.append(code[:-1].strip())
                continue
            if background:
                started = "; ".join(f"{{ {b} ; }} & p{i}=$!" for i, b in enumerate(background))
                waits = " && ".join(f"wait $p{i}" for i in range(len(background)))
                command = f"set -e; {started}; {code}; {waits}"
                background = []
            steps.append(command)
        assert not background, f"a block ends with a command in the background: {background}"
        return steps


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README with its language and the doc-test markers before it."""
    lines = (text if text is not None else README.read_text()).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        directives, k = [], i - 1
        while k >= 0 and (not lines[k].strip() or lines[k].lstrip().startswith("<!--")):
            marker = re.match(r"^\s*<!--\s*doc-test:\s*([\w-]+)\s*(.*?)\s*-->\s*$", lines[k])
            if marker:
                directives.insert(0, (marker[1], marker[2]))
            elif lines[k].strip():
                break  # another comment: markers are only the ones right before the fence
            k -= 1
        blocks.append(Block(i + 1, fence[1], "\n".join(lines[i + 1 : end]), directives))
        i = end + 1
    return blocks


def runnable(block: Block) -> bool:
    return block.lang in (*SHELL, "sql") and not block.directive("skip") and not block.directive("covered-by")


# --- the markers themselves -------------------------------------------------------------------------------------
def test_markers_are_well_formed_and_their_tests_exist():
    blocks = readme_blocks()
    assert any(runnable(b) for b in blocks)
    for block in blocks:
        where = f"README.md:{block.line}"
        for key, arg in block.directives:
            assert key in DIRECTIVES, f"{where}: unknown doc-test marker {key!r} (known: {', '.join(DIRECTIVES)})"
            assert arg, f"{where}: `doc-test: {key}` needs its argument (a reason, a test, arguments, a session)"
        for covered in (arg for key, arg in block.directives if key == "covered-by"):
            path, _, name = covered.partition("::")
            assert (REPO / path).is_file(), f"{where}: covered-by names {path}, which does not exist"
            assert re.search(rf"^(async )?def {re.escape(name)}\(", (REPO / path).read_text(), re.M), (
                f"{where}: {path} has no test {name}"
            )


def test_the_parser_reads_markers_continuations_and_comments():
    text = "\n".join(
        [
            "<!-- doc-test: skip (needs the nats CLI) -->",
            "",
            "```sh",
            "nats stream ls   # streams",
            "```",
            "Some prose.",
            "<!-- doc-test: shorten --speed 0 -->",
            "```sh",
            "# a comment line",
            ".venv/bin/python bench/x.py --a 1 \\",
            "    --b 2",
            "```",
            "```sql",
            "SELECT 1;",
            "```",
        ]
    )
    skip, bench, sql = readme_blocks(text)
    assert skip.directive("skip") == "(needs the nats CLI)" and not runnable(skip)
    assert bench.directive("shorten") == "--speed 0" and bench.commands == [".venv/bin/python bench/x.py --a 1 --b 2"]
    assert sql.lang == "sql" and runnable(sql)
    assert top_level_keys('{"service": "x", "ready": true, "checks": {"consumer": "ok", ...}}') == {
        "service",
        "ready",
        "checks",
    }


# --- running them ----------------------------------------------------------------------------------------------
class Workspace:
    """A scratch folder that looks like a clone to the README's commands: `.venv` and `bench` of this checkout."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / ".venv").symlink_to(Path(sys.prefix))
        (root / "bench").symlink_to(REPO / "bench")
        from bench.common import generated_devset

        # NATS_CREDS too: the commands connect as a user's do, as the operator of the stack running here. The
        # stack keeps the session's keyring (JETSCRIBE_NATS_KEYS), whose root user this test's own connections use.
        drop = (
            "NATS_URL",
            "DATABASE_URL",
            "NATS_CREDS",
            "JETSCRIBE_HOME",
            "JETSCRIBE_LOG_LEVEL",
            "JETSCRIBE_LOG_FORMAT",
        )
        self.env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_")}
        self.env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            JETSCRIBE_MODEL="null",
            JETSCRIBE_DEVSET=str(generated_devset()),  # the same small set wherever the checkout lies
            PYTHONUNBUFFERED="1",
        )
        self.stack: subprocess.Popen | None = None

    def popen(self, command: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=self.root,
            env=self.env,
            text=True,
            start_new_session=True,  # SIGINT to the command's group, as Ctrl-C on a terminal
            **kwargs,
        )

    def run(self, command: str, where: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
        """Run one command to its end; its stdout (stderr joins it on failure)."""
        proc = self.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{where}: `{command}` did not end in {timeout_s:g} s (a long run? mark it):\n{err[-3000:]}")
        assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
        return out + err

    def run_live(self, command: str, where: str) -> str:
        """A command that runs until Ctrl-C, on a terminal (a pty) as a user runs it: once it has drawn its first
        view, SIGINT; it must exit 0."""
        import pty

        leader, follower = pty.openpty()
        proc = self.popen(command, stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE)
        os.close(follower)
        shown = b""
        try:
            deadline = time.monotonic() + COMMAND_TIMEOUT_S
            while not shown.strip() and time.monotonic() < deadline and proc.poll() is None:
                if select.select([leader], [], [], 0.5)[0]:
                    shown += os.read(leader, 65536)
            ended_early = proc.poll() is not None
            if not ended_early:
                time.sleep(LIVE_S)  # a few refreshes of the live view
                os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=30)
            while select.select([leader], [], [], 0.1)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed with the process
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            os.close(leader)
        assert proc.returncode == 0, f"{where}: `{command}` exited {proc.returncode}:\n{err[-3000:]}"
        assert not ended_early, f"{where}: `{command}` is documented as live (Ctrl-C) but ended by itself"
        assert shown.strip(), f"{where}: `{command}` showed nothing in {COMMAND_TIMEOUT_S:g} s"
        return shown.decode(errors="replace") + err

    # the stack
    def stack_file(self) -> Path:
        return self.root / ".jetscribe" / "stack.json"

    def stack_running(self) -> bool:
        if not self.stack_file().exists():
            return False
        try:
            os.kill(json.loads(self.stack_file().read_text())["pid"], 0)
        except (OSError, ValueError, KeyError):
            return False
        return True

    def start_stack(self, command: str = "jetscribe up --model null", where: str = "the test") -> None:
        """`jetscribe up` in the background, until it says it is up."""
        self.stop_stack()
        log = (self.root / "up.log").open("a")
        self.stack = self.popen(command, stdout=subprocess.PIPE, stderr=log)
        assert self.stack.stdout is not None
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        for line in self.stack.stdout:
            if line.startswith("jetscribe is up"):
                return
            assert time.monotonic() < deadline, f"{where}: `{command}` not up in {COMMAND_TIMEOUT_S:g} s"
        if self.stack.wait() == 0 and self.stack_running():  # it detached (`up -d`): the stack runs on
            self.stack = None
            return
        pytest.fail(f"{where}: `{command}` exited {self.stack.returncode}:\n{(self.root / 'up.log').read_text()}")

    def stop_stack(self) -> None:
        if self.stack is not None and self.stack.poll() is None:
            os.killpg(self.stack.pid, signal.SIGINT)
            try:
                assert self.stack.wait(60) == 0, f"jetscribe up exited {self.stack.returncode} on Ctrl-C"
            finally:
                if self.stack.poll() is None:
                    os.killpg(self.stack.pid, signal.SIGKILL)
        self.stack = None

    def urls(self) -> dict:
        return json.loads(self.stack_file().read_text())


@pytest.fixture
def workspace():
    # Not under pytest's tmp_path (0700 as root): PostgreSQL runs as its own user and must reach the binaries
    # through `.venv` here, as in a clone.
    root = Path(tempfile.mkdtemp(prefix="jetscribe-readme-"))
    root.chmod(0o755)
    space = Workspace(root / "clone")
    try:
        yield space
    finally:
        space.stop_stack()
        if space.stack_running():  # a block started one that outlived it (`up -d`): ours to stop
            space.run("jetscribe down || true", "cleanup", timeout_s=60)
        shutil.rmtree(root, ignore_errors=True)


def test_readme_blocks_run_against_a_running_stack(workspace):
    from jetscribe.evaluation.speech import sample_speech, write_wav

    write_wav(workspace.root / "sample.wav", sample_speech())
    workspace.start_stack()
    ran = 0
    for block in readme_blocks():
        if not runnable(block) or block.directive("shorten"):
            continue
        if not workspace.stack_running():
            workspace.start_stack()
        where = f"README.md:{block.line}"
        for spec in (block.directive("files") or "").split():
            name, _, channels = spec.partition(":")
            write_clip(workspace.root / name, int(channels or 1))
        live = block.directive("live-session")
        streaming = start_live_session(workspace, live) if live else None
        if block.lang == "sql":
            run_sql(workspace, block, where)
        for command in block.steps if block.lang != "sql" else []:
            run_command(workspace, command, where)
            ran += 1
        if streaming is not None:
            out, err = streaming.communicate(timeout=COMMAND_TIMEOUT_S)
            assert streaming.returncode == 0, f"{where}: the live session's `jetscribe stream` failed:\n{err}"
    for command in TABLE_COMMANDS:
        output = run_command(workspace, command, "the CLI table")
        if command.startswith("jetscribe sessions"):
            assert re.search(r"^acme\s+s1\s+ended\s", output, re.M), output
    assert ran >= 10


def run_command(workspace: Workspace, command: str, where: str) -> str:
    started = time.monotonic()
    try:
        return _run_command(workspace, command, where)
    finally:
        print(f"{where}: {time.monotonic() - started:5.1f} s  {command[:100]}", file=sys.stderr)


def _run_command(workspace: Workspace, command: str, where: str) -> str:
    words = shlex.split(command, comments=True)
    code, comment = (command.split(" #", 1) + [""])[:2]
    if words[:2] == ["jetscribe", "up"] and "-d" not in words:
        workspace.start_stack(code.strip(), where)
        return ""
    if "PORT" in words or re.search(r"\bPORT\b", code):
        code = re.sub(r"\bPORT\b", str(served_port(workspace)), code)
    if "Ctrl-C" in comment:
        return workspace.run_live(code, where)
    output = workspace.run(code, where)
    shown = re.search(r"\{.*\}", comment)
    if shown:  # the README shows the output: the same object, in substance
        keys = top_level_keys(shown[0])
        printed = json.loads(output.strip().splitlines()[-1])
        assert keys <= set(printed), f"{where}: `{code}` printed {printed}, the README shows keys {sorted(keys)}"
    if words[:2] == ["jetscribe", "follow"]:
        check_follow(words, output, where)
    return output


def top_level_keys(shown: str) -> set[str]:
    """The keys of the outermost object a README comment shows: `{"ready": true, "checks": {"consumer": "ok"}}`."""
    keys, depth = set(), 0
    for match in re.finditer(r'[{}]|"(\w+)":', shown):
        if match[0] == "{":
            depth += 1
        elif match[0] == "}":
            depth -= 1
        elif depth == 1:
            keys.add(match[1])
    return keys


def write_clip(path: Path, channels: int) -> None:
    import numpy as np
    import soundfile

    from jetscribe.evaluation.speech import sample_speech

    speech = sample_speech()
    clip = speech.audio[: int(CLIP_S * speech.sample_rate)]
    soundfile.write(str(path), np.stack([clip] * channels, axis=1) if channels > 1 else clip, speech.sample_rate)


def check_follow(words: list[str], output: str, where: str) -> None:
    """The live session's finals were printed and the command ended at its `ended` event."""
    if "s1" not in words:  # only the live session's output is known here
        return
    if not {"--from-start", "--since", "--from-seq"} & set(words) and "already ended" in output:
        return  # "from now on", run after the live session ended: it says so and exits (README: Following a session)
    if "--format" in words and words[words.index("--format") + 1] == "json":
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        assert any(m["type"] == "segment" and m["status"] == "final" and m["words"] for m in lines), where
        assert lines[-1]["type"] == "session_event" and lines[-1]["event"] == "ended", f"{where}: {lines[-1]}"
        assert all(m["stream_seq"] >= int(words[words.index("--from-seq") + 1]) for m in lines if "--from-seq" in words)
    else:
        assert re.search(r"^\[\s*[\d.]+ -\s*[\d.]+\] null", output, re.M), f"{where}: no final line in:\n{output}"
        assert "-- session s1 ended" in output, f"{where}: no end in:\n{output}"


def start_live_session(workspace: Workspace, spec: str) -> subprocess.Popen:
    tenant, _, session = spec.partition("/")
    asyncio.run(fill_transcripts(workspace.urls()["nats_url"], PADDED_TO_SEQ))
    command = f"jetscribe stream sample.wav --session {session} --tenant {tenant}"
    streaming = workspace.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The block's commands start once the session has: `follow` without --wait says "no such session" otherwise.
    asyncio.run(wait_for_start(workspace.urls()["nats_url"], tenant, session))
    return streaming


async def wait_for_start(url: str, tenant: str, session: str, timeout_s: float = 60.0) -> None:
    """Until TRANSCRIPTS holds the session's `started` event."""
    import nats

    from jetscribe.shared import subjects
    from jetscribe.shared.natsauth import env_connect_options

    nc = await nats.connect(url, **env_connect_options(url))
    try:
        js = nc.jetstream()
        subject = subjects.session_event(tenant, session, "started")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await js.get_last_msg(subjects.TRANSCRIPTS_STREAM, subject)
                return
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, f"{tenant}/{session} did not start within {timeout_s:g} s"
                await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def fill_transcripts(url: str, to_seq: int) -> None:
    """Interims of a session of tenant `pad` into TRANSCRIPTS until its last seq is `to_seq`."""
    import nats

    from jetscribe.shared import subjects
    from jetscribe.shared.natsauth import env_connect_options
    from jetscribe.shared.wire import Segment, encode

    nc = await nats.connect(url, **env_connect_options(url))
    try:
        js = nc.jetstream()
        last = (await js.stream_info(subjects.TRANSCRIPTS_STREAM)).state.last_seq
        for n in range(last, to_seq):
            segment = Segment(
                tenant="pad", session_id="p0", segment_id=n, revision=0, status="interim", start=0.0, end=1.0, text="-"
            )
            await js.publish(subjects.transcript("pad", "p0"), encode(segment))
    finally:
        await nc.close()


def served_port(workspace: Workspace) -> int:
    """The metrics port of the worker that served the live session (its final latency is recorded there)."""
    import nats

    from jetscribe.shared.natsauth import env_connect_options
    from tests.integration.running import gather_replies

    async def ports() -> dict[str, int]:
        url = workspace.urls()["nats_url"]
        nc = await nats.connect(url, **env_connect_options(url))  # the tests' root user (NATS_CREDS)
        try:
            replies = await gather_replies(nc, "$SRV.INFO.jetscribe-transcriber", 1.0)
        finally:
            await nc.close()
        return {r["metadata"]["worker_id"]: int(r["metadata"]["metrics_port"]) for r in replies}

    by_worker = asyncio.run(ports())
    worker = stored_worker(workspace.urls(), "acme", "s1")
    return by_worker[worker]


def reader_engine(stack_urls: dict):
    """The stack's PostgreSQL as its readers' role (stack.json names its URL and password file), as the CLI reads."""
    from sqlalchemy import create_engine

    from jetscribe.services.persister.store import sqlalchemy_url
    from jetscribe.shared.config import PostgresClient

    reader = stack_urls["database_roles"]["reader"]
    client = PostgresClient(password_file=reader["password_file"])
    return create_engine(sqlalchemy_url(reader["url"]), connect_args=client.connect_args())


def stored_worker(stack_urls: dict, tenant: str, session: str) -> str:
    from sqlalchemy import text

    engine = reader_engine(stack_urls)
    try:
        with engine.connect() as connection:
            query = text("SELECT worker_id FROM sessions WHERE tenant = :t AND session_id = :s")
            return str(connection.execute(query, {"t": tenant, "s": session}).scalar_one())
    finally:
        engine.dispose()


def run_sql(workspace: Workspace, block: Block, where: str) -> None:
    """Each statement of an SQL block on the stack's PostgreSQL; a query must answer rows."""
    from sqlalchemy import text

    engine = reader_engine(workspace.urls())  # what the README's SQL needs: reading
    try:
        with engine.connect() as connection:
            for statement in (s.strip() for s in block.text.split(";")):
                if statement:
                    rows = connection.execute(text(statement)).fetchall()
                    assert rows, f"{where}: `{statement}` answered no rows"
    finally:
        engine.dispose()


# --- benchmarks, shortened --------------------------------------------------------------------------------------
BENCHMARKS = [b for b in readme_blocks() if runnable(b) and b.directive("shorten")]


@pytest.mark.parametrize("block", BENCHMARKS, ids=[f"README.md:{b.line}" for b in BENCHMARKS])
def test_benchmark_block_runs_shortened(workspace, block):
    """A benchmark block's commands as the README writes them, with the marker's arguments making them short."""
    extra = block.directive("shorten")
    for command in block.commands:
        code = command.split(" #", 1)[0].strip()
        workspace.run(f"{code} {extra}", f"README.md:{block.line}", timeout_s=COMMAND_TIMEOUT_S * 2)
