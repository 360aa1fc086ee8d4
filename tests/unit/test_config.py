"""check-config: every error kind exits 78 and names its key; valid configs exit 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import main
from agent.config import Config, load_config
from tests.helpers.env import valid_config, write_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config.example.yaml"


def check(
    tmp_path: Path, config: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    path = write_config(tmp_path, config)
    code = main(["check-config", "--config", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_valid_config_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(tmp_path, valid_config(tmp_path), capsys)
    assert code == 0, out
    assert "OK" in out


def test_empty_file_uses_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    config = load_config(path)
    assert config.control_plane is None
    assert config.health.listen == "127.0.0.1:8787"
    assert config.runtime.job_user == "65534:65534"


def _set(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return config


@pytest.mark.parametrize(
    ("key", "value", "expect_key", "expect_words"),
    [
        ("node.colour", "red", "node.colour", "unknown key"),
        ("surprise", 1, "surprise", "unknown key"),
        (
            "limits.max_concurrent_jobs",
            "2",
            "limits.max_concurrent_jobs",
            'expected a whole number, got the string "2" (write it without quotes)',
        ),
        ("health.allow_remote", "yes", "health.allow_remote", "expected true or false"),
        (
            "runtime.allowed_images",
            "registry/*",
            "runtime.allowed_images",
            "expected a list of image patterns, got a string",
        ),
        ("limits.max_concurrent_jobs", 0, "limits.max_concurrent_jobs", "must be 1 or more, got 0"),
        ("limits.pids", -5, "limits.pids", "must be 1 or more, got -5"),
        ("results.max_bytes", 0, "results.max_bytes", "must be 1 or more"),
        ("models.cache_max_mib", 0, "models.cache_max_mib", "must be 1 or more"),
        ("runtime.stop_grace_s", 0, "runtime.stop_grace_s", "must be 1 or more"),
        ("runtime.job_user", "0:0", "runtime.job_user", "root"),
        ("logging.format", "xml", "logging.format", "expected one of json or console"),
        (
            "control_plane.url",
            "ws://cp.example.com/agent/v1",
            "control_plane.url",
            "allow_insecure",
        ),
        ("control_plane.url", "https://cp.example.com", "control_plane.url", "wss://"),
        (
            "control_plane.token_file",
            "/nonexistent/token",
            "control_plane.token_file",
            "does not exist",
        ),
        ("health.listen", "0.0.0.0:8787", "health.listen", "allow_remote"),
        ("health.listen", "10.1.2.3:8787", "health.listen", "not a loopback"),
        ("health.listen", "127.0.0.1", "health.listen", "HOST:PORT"),
        ("health.listen", "127.0.0.1:99999", "health.listen", "1 to 65535"),
        ("control_plane.reconnect.max_s", 0.5, "control_plane.reconnect.max_s", "initial_s"),
    ],
)
def test_each_error_names_its_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: Any,
    expect_key: str,
    expect_words: str,
) -> None:
    code, out = check(tmp_path, _set(valid_config(tmp_path), key, value), capsys)
    assert code == 78, out
    line = next((ln for ln in out.splitlines() if ln.strip().startswith(expect_key + ":")), None)
    assert line is not None, f"no line for {expect_key} in:\n{out}"
    assert expect_words in line


def test_datastore_path_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = valid_config(tmp_path)
    config["datastores"][0]["path"] = str(tmp_path / "gone")
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    assert f"datastores[0].path: {tmp_path / 'gone'} does not exist" in out


def test_datastore_path_not_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = valid_config(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    config["datastores"].append({"name": "second", "path": str(afile)})
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    assert "datastores[1].path:" in out
    assert "is not a directory" in out


def test_duplicate_datastore_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = valid_config(tmp_path)
    config["datastores"].append(dict(config["datastores"][0]))
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    assert "datastores[1].name: 'vitals' is already used by datastores[0]" in out


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_token_file_readable_by_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    config = valid_config(tmp_path)
    Path(config["control_plane"]["token_file"]).chmod(mode)
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    assert "control_plane.token_file:" in out
    assert f"mode {mode:04o}" in out


def test_token_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = valid_config(tmp_path)
    token_path = Path(config["control_plane"]["token_file"])
    token_path.chmod(0o644)
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    assert token_path.read_text().strip() not in out


def test_loopback_ws_and_explicit_opt_ins_are_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = valid_config(tmp_path)
    config["control_plane"]["url"] = "ws://127.0.0.1:9000/agent/v1"
    assert check(tmp_path, config, capsys)[0] == 0
    config["control_plane"]["url"] = "ws://[::1]:9000/agent/v1"
    assert check(tmp_path, config, capsys)[0] == 0
    config["control_plane"]["url"] = "ws://cp.internal:9000/agent/v1"
    config["control_plane"]["allow_insecure"] = True
    config["health"] = {"listen": "0.0.0.0:8787", "allow_remote": True}
    assert check(tmp_path, config, capsys)[0] == 0


def test_yaml_syntax_error_names_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("node:\n  id: a\n  labels: {site: [unclosed\n")
    assert main(["check-config", "--config", str(path)]) == 78
    assert "not valid YAML (line" in capsys.readouterr().err


def test_duplicate_yaml_key_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("limits:\n  pids: 10\nlimits:\n  pids: 20\n")
    assert main(["check-config", "--config", str(path)]) == 78
    assert "  limits: duplicate key (lines 1 and 3); keep one of them" in capsys.readouterr().err


def test_a_duplicate_key_hides_no_other_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack (on the administrator's time): a repeated key stopped validation at the
    parser, so each fix-and-rerun showed one more problem that was there all along."""
    config = valid_config(tmp_path)
    config["limits"] = {"max_concurrent_jobs": 0}
    config["node"]["colour"] = "red"
    config["datastores"][0]["path"] = "/nowhere"
    Path(config["control_plane"]["token_file"]).chmod(0o644)
    path = tmp_path / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    path.write_text(text + "logging:\n  level: debug\n")  # the second `logging`
    assert main(["check-config", "--config", str(path)]) == 78
    err = capsys.readouterr().err
    assert "5 problems" in err, err
    for key in (
        "logging: duplicate key",
        "node.colour: unknown key",
        "control_plane.token_file:",
        "datastores[0].path: /nowhere does not exist",
        "limits.max_concurrent_jobs: must be 1 or more",
    ):
        assert f"  {key}" in err, err


def test_a_local_command_refuses_a_duplicate_only_in_what_it_reads(tmp_path: Path) -> None:
    """Attack (on the operator, by an unrelated mistake): a repeated `limits` key made
    `status` exit 78, while a repeated `health` key must not send it to either port."""
    from agent.config.loading import load_sections
    from agent.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("limits: {pids: 1}\nlimits: {pids: 2}\nhealth: {listen: '127.0.0.1:1'}\n")
    config, ignored = load_sections(path, ["health"])
    assert config.health.listen == "127.0.0.1:1"
    assert ignored == ["limits: duplicate key (lines 1 and 2); keep one of them"]
    path.write_text("health: {listen: '127.0.0.1:1'}\nhealth: {listen: '127.0.0.1:2'}\n")
    with pytest.raises(ConfigError, match="health: duplicate key"):
        load_sections(path, ["health"])


def test_a_duplicate_key_in_a_list_item_names_its_place(tmp_path: Path) -> None:
    from agent.config.loading import _parse_yaml

    text = "datastores:\n  - name: a\n    path: /x\n  - name: b\n    name: c\n"
    _data, problems = _parse_yaml(text, tmp_path / "c.yaml")
    assert problems == ["datastores[1].name: duplicate key (lines 4 and 5); keep one of them"]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.yaml")]) == 78
    assert "config file does not exist" in capsys.readouterr().err


def test_five_problems_reported_at_once(tmp_path: Path) -> None:
    """Through the installed command, as a person runs it."""
    config = valid_config(tmp_path)
    config["node"]["colour"] = "red"  # 1 unknown key
    config["limits"] = {"max_concurrent_jobs": 0}  # 2 not positive
    config["datastores"][0]["path"] = "/nonexistent/vitals"  # 3 missing path
    config["health"]["listen"] = "0.0.0.0:8787"  # 4 remote listener
    Path(config["control_plane"]["token_file"]).chmod(0o644)  # 5 token readable
    path = write_config(tmp_path, config)
    exe = shutil.which("cloudbender-agent") or str(
        Path(sys.executable).parent / "cloudbender-agent"
    )
    proc = subprocess.run(
        [exe, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78, proc.stderr
    assert "5 problems" in proc.stderr
    for key in (
        "node.colour:",
        "limits.max_concurrent_jobs:",
        "datastores[0].path:",
        "health.listen:",
        "control_plane.token_file:",
    ):
        assert f"  {key}" in proc.stderr, proc.stderr


# -- the project's words ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        (
            "limits.max_concurent_jobs",
            3,
            "limits.max_concurent_jobs: unknown key; did you mean max_concurrent_jobs?",
        ),
        ("runtime.max_cpus", 3, "runtime.max_cpus: unknown key; did you mean limits.max_cpus?"),
        ("datastore", [], "datastore: unknown key; did you mean datastores?"),
        ("node.colour", "red", "node.colour: unknown key"),  # nothing near: no guess
    ],
)
def test_an_unknown_key_suggests_the_nearest_known_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, line: str
) -> None:
    """Attack (on the administrator, by a typo): `max_concurent_jobs` was "unknown key",
    leaving them to spot the missing letter against the docs."""
    code, out = check(tmp_path, _set(valid_config(tmp_path), key, value), capsys)
    assert code == 78
    assert f"  {line}\n" in out, out


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        (
            "runtime.allowed_images",
            "x/*",
            "runtime.allowed_images: expected a list of image patterns, got a string",
        ),
        (
            "runtime.allowed_images",
            ["x/*", 3],
            "runtime.allowed_images[1]: expected an image pattern (a string), "
            "got the whole number 3",
        ),
        ("gpus.allow", "some", "gpus.allow: expected all, or a list of GPU indexes or UUIDs"),
        ("gpus.allow", [1.5], "gpus.allow[0]: expected a GPU index or UUID, got the number 1.5"),
        ("limits", [1], "limits: expected a section: a mapping of keys to values, got a list"),
        ("limits.max_cpus", 0, "limits.max_cpus: must be at least 0.01, got 0"),
        ("node.id", "a b", "node.id: must be 1 to 128 letters, digits, '.', '_' or '-'"),
        ("runtime.job_user", "nobody", "runtime.job_user: must be UID:GID in numbers"),
        ("health.listen", None, "health.listen: expected a string, got nothing"),
    ],
)
def test_messages_are_in_the_projects_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: Any, line: str
) -> None:
    """Attack (on the administrator's reading): `Input should be a valid tuple` for a
    string where a list belongs; a Python type named, not what the key wants."""
    code, out = check(tmp_path, _set(valid_config(tmp_path), key, value), capsys)
    assert code == 78
    assert f"  {line}" in out, out
    assert "Input should" not in out and "tuple" not in out
    assert len(out.strip().splitlines()) == 2, out  # one line per problem, union or not


def test_a_string_value_is_never_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack (on the token): a token pasted as a value where a list belongs was quoted
    back in the problem line, and so on the terminal and in any pasted support ticket."""
    secret = "tok-9f8e7d6c5b4a39281706"
    config = valid_config(tmp_path)
    config["runtime"] = {"allowed_images": secret, "job_user": secret}
    config["limits"] = {"max_cpus": secret}
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    assert secret not in out
    assert out.count("\n  ") == 3, out


def test_a_short_token_is_reported_with_a_bad_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack (on the administrator's time): a 0644 token file holding a truncated token
    showed only the mode; after chmod 600 the next run found the token too short."""
    config = valid_config(tmp_path)
    token = Path(config["control_plane"]["token_file"])
    token.write_text("short-token\n")
    token.chmod(0o644)
    code, out = check(tmp_path, config, capsys)
    assert code == 78
    lines = [ln for ln in out.splitlines() if ln.startswith("  control_plane.token_file:")]
    assert len(lines) == 2, out
    assert "(mode 0644)" in lines[0] and "shorter than 16 characters" in lines[1]
    assert "short-token" not in out


def test_a_client_key_readable_by_others_and_not_matching_says_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: dict[str, Path]
) -> None:
    """Attack (on the administrator's time): the same one-at-a-time report for the TLS
    key: fixing the mode only revealed that the key belongs to another certificate."""
    key = tmp_path / "b.key"
    key.write_bytes(pki["b.key"].read_bytes())
    key.chmod(0o640)
    code, out = check(tmp_path, _tls(tmp_path, client_cert=pki["a.crt"], client_key=key), capsys)
    assert code == 78
    lines = [ln for ln in out.splitlines() if ln.startswith("  control_plane.client_key:")]
    assert len(lines) == 2, out
    assert "(mode 0640)" in lines[0] and "does not match" in lines[1]


def test_a_cpu_cap_above_the_nodes_cpus_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack (on the administrator's belief): `limits.max_cpus: 64` on a 4-CPU node
    passed silently, though no job can ever get more than 4."""
    from agent.config.host_warnings import node_cpus

    cpus = node_cpus()
    config = valid_config(tmp_path)
    config["limits"] = {"max_cpus": cpus + 0.5}
    code, out = check(tmp_path, config, capsys)
    assert code == 0, out
    expected = f"warning: limits.max_cpus: {cpus + 0.5:g} is more than this node's {cpus} CPU(s)"
    assert expected in out
    config["limits"] = {"max_cpus": cpus}
    code, out = check(tmp_path, config, capsys)
    assert code == 0 and "warning" not in out, out


def test_the_default_cpu_cap_is_not_a_warning(tmp_path: Path) -> None:
    from agent.config.host_warnings import host_warnings

    assert host_warnings(load_config(write_config(tmp_path, valid_config(tmp_path))), cpus=1) == []


def test_installed_command_reports_duplicate_and_typo_and_warns(tmp_path: Path) -> None:
    """Through the installed command, as a person runs it: a duplicate key and a typo are
    both reported (exit 78); once fixed, a CPU cap too big for the node is a warning on
    stderr and the exit is 0."""
    from agent.config.host_warnings import node_cpus

    config = valid_config(tmp_path)
    config["limits"] = {"max_concurent_jobs": 3}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False) + "logging: {level: debug}\n")
    exe = shutil.which("cloudbender-agent") or str(
        Path(sys.executable).parent / "cloudbender-agent"
    )
    proc = subprocess.run(
        [exe, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78, proc.stderr
    assert "  logging: duplicate key" in proc.stderr
    assert "did you mean max_concurrent_jobs?" in proc.stderr
    config["limits"] = {"max_cpus": node_cpus() + 1}
    path = write_config(tmp_path, config)
    proc = subprocess.run(
        [exe, "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: limits.max_cpus:" in proc.stderr and ": OK" in proc.stdout


def _keys(model: type[Any], prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    keys: set[str] = set()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.add(dotted)
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        for candidate in candidates:
            inner = getattr(candidate, "__args__", (candidate,))
            for sub in inner:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    keys |= _keys(sub, dotted + ".")
    return keys


def _yaml_keys(data: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            keys.add(prefix + key)
            keys |= _yaml_keys(value, prefix + key + ".")
    elif isinstance(data, list) and data and isinstance(data[0], dict):
        keys |= _yaml_keys(data[0], prefix)
    return keys


def test_example_documents_every_key() -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    missing = _keys(Config) - _yaml_keys(example)
    assert not missing, f"config.example.yaml lacks {sorted(missing)}"


def test_example_is_valid_once_pointed_at_real_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = yaml.safe_load(EXAMPLE.read_text())
    real = valid_config(tmp_path)
    example["datastores"][0]["path"] = real["datastores"][0]["path"]
    example["control_plane"]["token_file"] = real["control_plane"]["token_file"]
    example["state_dir"] = real["state_dir"]
    code, out = check(tmp_path, example, capsys)
    assert code == 0, out


# -- the token file's content ------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "is empty"),
        (b"  \n\n", "is empty"),
        (b"first-half-of-it\nsecond-half-of-it\n", "whitespace, control or non-ASCII"),
        (b"first-half-of-it\rsecond-half-of-it", "whitespace, control or non-ASCII"),
        (b"tokA tokB-0123456789", "whitespace, control or non-ASCII"),
        (b"ctl\x1bchars-0123456789", "whitespace, control or non-ASCII"),
        (b"caf\xc3\xa9-0123456789abcdef", "whitespace, control or non-ASCII"),
        (b"short-token-15ch", None),  # 16: the shortest allowed
        (b"short-token-15c", "shorter than 16 characters"),
        (b"x" * 5000, "larger than 4096 bytes"),
    ],
)
def test_token_content_is_checked_and_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, words: str | None
) -> None:
    config = valid_config(tmp_path)
    Path(config["control_plane"]["token_file"]).write_bytes(content)
    code, out = check(tmp_path, config, capsys)
    if words is None:
        assert code == 0, out
        return
    assert code == 78, out
    line = next(ln for ln in out.splitlines() if "control_plane.token_file:" in ln)
    assert words in line
    for part in content.decode("latin-1").split():
        if len(part) > 3:
            assert part not in out


# -- TLS files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed client certificate and keys in every shape, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    for name in ("a", "b"):
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.crt"),
        )  # fmt: skip
    openssl(
        "pkey",
        "-in",
        str(d / "a.key"),
        "-aes256",
        "-passout",
        "pass:pw",
        "-out",
        str(d / "enc.key"),
    )
    (d / "combined.pem").write_bytes((d / "a.crt").read_bytes() + (d / "a.key").read_bytes())
    (d / "combined_enc.pem").write_bytes((d / "a.crt").read_bytes() + (d / "enc.key").read_bytes())
    (d / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    for path in d.iterdir():
        path.chmod(0o600)
    return {p.stem if p.suffix == ".pem" else p.name: p for p in d.iterdir()}


def _tls(tmp_path: Path, **files: Path) -> dict[str, Any]:
    config = valid_config(tmp_path)
    config["control_plane"].update({k: str(v) for k, v in files.items()})
    return config


@pytest.mark.parametrize(
    ("files", "key", "words"),
    [
        ({"ca_file": "garbage"}, "ca_file", "holds no PEM certificate"),
        ({"ca_file": "a.key"}, "ca_file", "holds no PEM certificate"),
        ({"client_cert": "garbage", "client_key": "a.key"}, "client_cert", "no PEM certificate"),
        ({"client_cert": "a.key", "client_key": "a.key"}, "client_cert", "no PEM certificate"),
        ({"client_cert": "a.crt", "client_key": "enc.key"}, "client_key", "is encrypted"),
        ({"client_cert": "combined_enc"}, "client_key", "is encrypted"),
        ({"client_cert": "a.crt", "client_key": "b.key"}, "client_key", "does not match"),
        ({"client_cert": "a.crt", "client_key": "garbage"}, "client_key", "no usable PEM private"),
        ({"client_cert": "a.crt"}, "client_key", "is not set, and"),
        ({"client_key": "a.key"}, "client_key", "without control_plane.client_cert"),
    ],
)
def test_tls_files_are_loaded_by_check_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    pki: dict[str, Path],
    files: dict[str, str],
    key: str,
    words: str,
) -> None:
    config = _tls(tmp_path, **{k: pki[v] for k, v in files.items()})
    code, out = check(tmp_path, config, capsys)
    assert code == 78, out
    line = next((ln for ln in out.splitlines() if f"control_plane.{key}:" in ln), None)
    assert line is not None, out
    assert words in line


@pytest.mark.parametrize(
    "files",
    [
        {"ca_file": "a.crt"},
        {"client_cert": "a.crt", "client_key": "a.key"},
        {"client_cert": "combined"},  # certificate and key in one PEM
        {"ca_file": "b.crt", "client_cert": "combined"},
    ],
)
def test_usable_tls_files_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: dict[str, Path], files: dict[str, str]
) -> None:
    config = _tls(tmp_path, **{k: pki[v] for k, v in files.items()})
    code, out = check(tmp_path, config, capsys)
    assert code == 0, out


def test_an_encrypted_key_never_prompts(pki: dict[str, Path]) -> None:
    """Run where a terminal could be opened: the check refuses at once, asking nothing."""
    from agent import tls

    with pytest.raises(tls.TlsSettingError) as caught:
        tls.client_context(ca_file=None, client_cert=pki["a.crt"], client_key=pki["enc.key"])
    assert caught.value.key == "client_key"
    assert "passphrase" in str(caught.value)


@pytest.mark.parametrize("key", ["ca_file", "client_cert", "client_key"])
def test_tls_settings_with_a_ws_url_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: dict[str, Path], key: str
) -> None:
    files = {"ca_file": pki["a.crt"], "client_cert": pki["a.crt"], "client_key": pki["a.key"]}
    config = _tls(tmp_path, **{key: files[key]})
    config["control_plane"]["url"] = "ws://127.0.0.1:9000/agent/v1"
    code, out = check(tmp_path, config, capsys)
    assert code == 78, out
    line = next(ln for ln in out.splitlines() if f"control_plane.{key}:" in ln)
    assert "ws://" in line


def test_an_upper_case_scheme_is_the_same_scheme(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: dict[str, Path]
) -> None:
    config = _tls(tmp_path, ca_file=pki["a.crt"])
    config["control_plane"]["url"] = "WSS://127.0.0.1:9000/agent/v1"
    assert check(tmp_path, config, capsys)[0] == 0
    assert load_config(write_config(tmp_path, config)).control_plane.scheme == "wss"  # type: ignore[union-attr]
    config["control_plane"]["url"] = "WS://127.0.0.1:9000/agent/v1"
    code, out = check(tmp_path, config, capsys)
    assert code == 78 and "control_plane.ca_file:" in out


def test_a_fifo_as_token_file_is_refused_without_hanging(tmp_path: Path) -> None:
    from agent.token_file import TokenFileError, read_token

    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(TokenFileError, match="not a regular file"):
        read_token(fifo)
