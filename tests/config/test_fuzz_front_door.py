"""Hypothesis fuzzing of the front door: moetrain.config.load_config and scripts/train.py's
argument handling. Whatever the file, override or flag, the library raises one one-line
ConfigError (or loads), and the CLI exits 2 with exactly one `error:` line naming the key."""
import contextlib
import dataclasses
import io
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import moetrain.compose
from moetrain.config import AttentionConfig, ConfigError, DataConfig, StageConfig, TrainConfig, load_config
from moetrain.config.mapping import _hints, _unwrap_optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
DEFAULT = os.path.join(ROOT, "configs", "default.yaml")
DEFAULT_TEXT = open(DEFAULT, encoding="utf-8").read()
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _leaves(cls, prefix=""):
    """(dotted path, field name, type) of every scalar/list/dict field of the config tree."""
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(_hints(cls)[f.name])
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, path + ".")
        elif f.name != "stages":
            yield path, f.name, tp


def _sections(cls, prefix=""):
    yield prefix, cls
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(_hints(cls)[f.name])
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}{f.name}.")


LEAVES = list(_leaves(TrainConfig))
SECTIONS = [(p.rstrip("."), {f.name for f in dataclasses.fields(c)}) for p, c in _sections(TrainConfig)]
STAGE = {"name": "s", "seq_len": 64, "steps": 3}

odd_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30) | st.sampled_from(
    ["\u2028", "a\nb", "\x85", "\u202e", "\x00", "é", "🙂", " ", "", "~", "null", "1e999", "-0", "0x10", "yes"])
hostile = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([2 ** 64, -2 ** 63, 10 ** 400])
    | st.floats(allow_nan=True, allow_infinity=True) | odd_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3), max_leaves=6)


def _nest(dotted: str, value):
    for k in reversed(dotted.split(".")):
        value = {k: value}
    return value


def library_error(path, overrides=()):
    """None if it loads; else the one-line ConfigError message (any other exception fails the test)."""
    try:
        load_config(path, overrides)
    except ConfigError as e:
        msg = str(e)
        assert msg and len(msg.splitlines()) == 1 and "Traceback" not in msg, repr(msg)
        return msg
    return None


@pytest.fixture(scope="module", autouse=True)
def _no_training():
    """The fuzzed CLI must stop at its front door; reaching training is a test failure."""
    def never(*a, **k):
        raise AssertionError("the CLI went past its checks into training")
    real, moetrain.compose.train = moetrain.compose.train, never
    yield
    moetrain.compose.train = real


def cli(argv) -> tuple:
    """scripts/train.py's main() in-process: (exit code, stderr lines)."""
    from scripts_train import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue().splitlines()


def assert_one_error(rc, lines, *fragments):
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def _write(tmp_path_factory, data: bytes) -> str:
    path = tmp_path_factory.mktemp("fz") / "c.yaml"
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------------- library
@settings(FUZZ, max_examples=250)
@given(leaf=st.sampled_from(LEAVES), value=hostile)
def test_any_value_for_any_key_loads_or_names_the_key(tmp_path_factory, leaf, value):
    path, name, _ = leaf
    text = yaml.safe_dump(_nest(path, value), allow_unicode=bool(value) and not isinstance(value, float))
    msg = library_error(_write(tmp_path_factory, text.encode()))
    if msg is not None:
        assert name in msg, (path, value, msg)


@settings(FUZZ, max_examples=120)
@given(section=st.sampled_from(SECTIONS + [("stages.0", None), ("stages.0.attention", None),
                                           ("stages.0.data", None)]), key=odd_text | st.integers() | st.booleans())
def test_unknown_key_at_any_level_is_named(tmp_path_factory, section, key):
    where, names = section
    assume(names is None or key not in names)
    if where.startswith("stages.0"):
        stage, sub = dict(STAGE), where.split(".")[2:]
        cls = {"attention": AttentionConfig, "data": DataConfig}[sub[0]] if sub else StageConfig
        assume(key not in {f.name for f in dataclasses.fields(cls)})
        if sub:
            stage[sub[0]] = {key: 1}
        else:
            stage[key] = 1
        tree = {"stages": [stage]}
    else:
        tree = _nest(where, {key: 1}) if where else {key: 1}
    msg = library_error(_write(tmp_path_factory, yaml.safe_dump(tree, allow_unicode=True).encode()))
    assert msg is not None and "unknown" in msg and ("did you mean" in msg or "valid keys" in msg
                                                     or "use fields of" in msg), msg


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_mutated_default_yaml_loads_or_fails_in_one_line(tmp_path_factory, data):
    raw = DEFAULT_TEXT.encode()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw)))
        junk = data.draw(st.binary(max_size=4) | st.sampled_from(
            [b"[", b"{", b": ", b"\t", b"&a ", b"*a", b"!!python/object:os.system ", b"\xff", b"- ", b"\n  ", b"'"]))
        cut = data.draw(st.integers(0, 6))
        raw = raw[:i] + junk + raw[i + cut:]
    library_error(_write(tmp_path_factory, raw))


@settings(FUZZ, max_examples=80)
@given(raw=st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8")))
def test_arbitrary_bytes_load_or_fail_in_one_line(tmp_path_factory, raw):
    library_error(_write(tmp_path_factory, raw))


@pytest.mark.parametrize("text,fragment", [
    (b"", None), (b"~\n", None), (b"- a\n- b\n", "must hold a mapping"), (b"42\n", "not a int"),
    (b"model: {hidden_size: 64\xff}\n", "not UTF-8 text (byte 0xff"),
    (b"\xef\xbb\xbfseed: 3\n", None),  # a UTF-8 byte-order mark is fine
    (b"model: !!python/object/apply:os.system [echo hi]\n", "safe_load"),
    (b"name: !!python/name:os.system\n", "safe_load"), (b"model: !custom {a: 1}\n", "safe_load"),
    (b"name: !!binary aGVsbG8=\n", "name: expected a string"),
    (b"a: &a [*a]\n", "aliases"),
    (b"x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(
        b"x%d: &x%d [" % (i, i) + b", ".join([b"*x%d" % (i - 1)] * 10) + b"]\n" for i in range(1, 8)), "aliases"),
    (b"optim: {betas: &b [0.9, 0.95]}\neval: {depths: *b}\n", None),  # plain anchors work
    (b"model: {hidden_size: " + b"9" * 5000 + b"}\n", "too long to read"),
    (b"model: {hidden_size: " + b"9" * 30 + b"}\n", "model.hidden_size"),
    (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    (b"model: {hidden_size: .nan}\n", "model.hidden_size: expected an integer"),
    (b"optim: {lr: .inf}\n", "optim.lr: expected a finite number"),
    (b"optim: {betas: [a, 0.9]}\n", "optim.betas"), (b"seed: -1\n", "seed=-1"),
    (b'train: {precision: "fp\\u2028x"}\n', "train.precision"),
])
def test_known_hostile_files(tmp_path, text, fragment):
    p = tmp_path / "c.yaml"
    p.write_bytes(text)
    msg = library_error(str(p))
    assert (msg is None) if fragment is None else (fragment in (msg or "")), msg


def test_missing_folder_and_unreadable_config(tmp_path):
    assert "does not exist" in library_error(str(tmp_path / "nope.yaml"))
    assert "is a folder" in library_error(str(tmp_path))
    if os.path.isfile("/proc/self/mem"):  # a file whose read() fails (even for root)
        assert "cannot be read" in library_error("/proc/self/mem")


# --------------------------------------------------------------------------- CLI, in-process
override = st.one_of(
    odd_text,  # often no '=' at all
    st.builds(lambda leaf, v: f"{leaf[0]}={v}", st.sampled_from(LEAVES), odd_text),
    st.builds(lambda k, v: f"{k}={v}", st.text(st.sampled_from("ab.=_0 "), max_size=8), odd_text),
    st.sampled_from(["a", "model.hidden_size=abc", "unknown.key=1", "model..x=1", "=3", ".=1", "model=3",
                     "model.hidden_size.x=1", "stages.9.seq_len=4", "name=!!python/name:os.system",
                     "train.max_steps=1e999", f"seed={'9' * 5000}"]))


@settings(FUZZ, max_examples=200)
@given(ov=override)
def test_cli_bad_set_is_one_error_line(ov):
    msg = library_error(DEFAULT, [ov])
    assume(msg is not None)
    rc, lines = cli(["--config", DEFAULT, f"--set={ov}"])
    assert_one_error(rc, lines)
    assert lines[0] == "error: " + msg


@settings(FUZZ, max_examples=100)
@given(leaf=st.sampled_from(LEAVES), value=hostile, unknown=st.booleans())
def test_cli_bad_config_file_is_one_error_line(tmp_path_factory, leaf, value, unknown):
    tree = _nest(leaf[0], value) if not unknown else _nest(leaf[0].rsplit(".", 1)[0] + ".zz_not_a_key", value)
    path = _write(tmp_path_factory, yaml.safe_dump(tree, allow_unicode=True).encode())
    msg = library_error(path)
    assume(msg is not None)
    run = str(tmp_path_factory.mktemp("run") / "r")
    rc, lines = cli(["--config", path, "--run-dir", run])
    assert_one_error(rc, lines, "zz_not_a_key" if unknown else leaf[1])
    assert lines[0] == "error: " + msg and not os.path.exists(run)


@settings(FUZZ, max_examples=60)
@given(resume=odd_text.filter(lambda s: s not in ("auto", "never") and not os.path.isdir(s)))
def test_cli_bad_resume_is_one_error_line(resume):
    rc, lines = cli(["--config", DEFAULT, f"--resume={resume}"])
    assert_one_error(rc, lines, "--resume", "auto, never")


@pytest.mark.parametrize("argv,fragment", [
    (["--set"], "--set: expected one argument"), (["--world-size", "abc"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"), (["--resume", "nevr"], "--resume"),
    (["--run-dir", DEFAULT], "--run-dir"), (["--config", "/nonexistent.yaml"], "does not exist"),
    (["--config", ROOT], "is a folder"),
])
def test_cli_bad_flags(argv, fragment):
    rc, lines = cli(argv)
    assert_one_error(rc, lines, fragment)


# --------------------------------------------------------------------------- CLI, real processes
def _run(args, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=120)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errors[0]


def test_subprocess_non_utf8_and_tag_files(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"model:\n  hidden_size: 64\n  \xfe\xff: 1\n")
    assert "is not UTF-8 text" in _run(["--config", "bin.yaml"], tmp_path)
    canary = tmp_path / "pwned"
    (tmp_path / "tag.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {canary}"]\n')
    assert "safe_load" in _run(["--config", "tag.yaml"], tmp_path)
    assert not canary.exists()


def test_subprocess_bad_override(tmp_path):
    line = _run(["--config", DEFAULT, "--set", "model.hidden_size=abc"], tmp_path)
    assert line == "error: model.hidden_size: expected an integer, got 'abc'"


def test_subprocess_resume_of_a_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notckpt").mkdir()
    run = tmp_path / "run"
    line = _run(["--config", DEFAULT, "--run-dir", str(run), "--resume", str(tmp_path / "notckpt"),
                 "--set", "data.recipe=null", "--set", f"data.dir={tmp_path / 'nodata'}"], tmp_path)
    assert "is not a complete checkpoint folder" in line and not run.exists()

