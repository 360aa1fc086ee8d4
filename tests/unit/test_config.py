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
        ("limits.max_concurrent_jobs", "2", "limits.max_concurrent_jobs", "valid integer"),
        ("health.allow_remote", "yes", "health.allow_remote", "valid boolean"),
        ("runtime.allowed_images", "registry/*", "runtime.allowed_images", "valid tuple"),
        ("limits.max_concurrent_jobs", 0, "limits.max_concurrent_jobs", "greater than 0"),
        ("limits.pids", -5, "limits.pids", "greater than 0"),
        ("results.max_bytes", 0, "results.max_bytes", "greater than 0"),
        ("models.cache_max_mib", 0, "models.cache_max_mib", "greater than 0"),
        ("runtime.stop_grace_s", 0, "runtime.stop_grace_s", "greater than 0"),
        ("runtime.job_user", "0:0", "runtime.job_user", "root"),
        ("logging.format", "xml", "logging.format", "'json' or 'console'"),
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
    assert "duplicate key 'limits'" in capsys.readouterr().err


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
