#!/usr/bin/env bash
# The agent's GPU path on a real GPU machine, in a few minutes. See docs/gpus.md
# ("Checking a real GPU machine") for what each step proves.
#
#   scripts/gpu-check.sh            run every step that this machine allows
#
# Steps: 1. `cloudbender-agent gpus --json` against `nvidia-smi --query-gpu` (uuid,
# name, bus id, memory, MIG mode, ECC) and `--query-remapped-rows`; 2. tests/gpu;
# 3. every NVML call the agent's code makes, with its return type or error; 4. where
# Docker and the NVIDIA container toolkit are present, a job container with one leased
# GPU through the agent's runtime (path chosen, post-start device check), and
# `nvidia-smi -L` inside must list exactly that GPU.
# Without a GPU it prints "no GPU" and exits 0. A failed comparison exits 1.
# Env: PYTHON (default .venv/bin/python), GPU_CHECK_IMAGE (a local image with glibc for
# step 4; default: the first local nvidia/cuda, ubuntu or debian image).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
STEP_TIMEOUT_S=${GPU_CHECK_STEP_TIMEOUT_S:-240}
failed=0
WORK=$(mktemp -d)
export WORK
trap 'rm -rf "$WORK"' EXIT

echo "gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no GPU: nvidia-smi is missing or finds no GPU; nothing to check"
    "$PYTHON" -m agent.cli gpus 2>/dev/null | head -3
    exit 0
fi
nvidia-smi -L
nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | sed 's/^/driver /'

echo "== 1. cloudbender-agent gpus --json against nvidia-smi"
QUERY=uuid,name,pci.bus_id,memory.total,memory.used,mig.mode.current,ecc.mode.current
nvidia-smi --query-gpu=$QUERY --format=csv,noheader,nounits >"$WORK/smi.csv"
nvidia-smi --query-remapped-rows=gpu_uuid,remapped_rows.pending,remapped_rows.failure \
    --format=csv,noheader >"$WORK/remap.csv" 2>&1 || true
"$PYTHON" -m agent.cli gpus --json >"$WORK/agent.json" || failed=1
"$PYTHON" - <<'EOF' || failed=1
import csv, json, os, sys
work = os.environ["WORK"]
agent = {g["uuid"]: g for g in json.load(open(f"{work}/agent.json"))["gpus"]}
bad = 0
for row in csv.reader(open(f"{work}/smi.csv")):
    uuid, name, bus, total, used, mig, ecc = (c.strip() for c in row)
    g = agent.get(uuid)
    if g is None:
        print(f"MISSING {uuid} {name}: nvidia-smi lists it, the agent does not"); bad = 1; continue
    diffs = []
    if g["name"] != name: diffs.append(f"name {g['name']!r} vs {name!r}")
    if str(g["pci_bus_id"]).lower() != bus.lower(): diffs.append(f"bus {g['pci_bus_id']} vs {bus}")
    if g["memory_total_mib"] != int(total): diffs.append(f"total {g['memory_total_mib']} vs {total} MiB")
    if used.isdigit() and g["memory_used_mib"] is not None and abs(g["memory_used_mib"] - int(used)) > 64:
        diffs.append(f"used {g['memory_used_mib']} vs {used} MiB (v1 memory info counts reserved)")
    print(f"{'DIFF' if diffs else 'same'} {uuid} {name} mig={mig} ecc={ecc} health={g['health']}",
          "; ".join(diffs))
    bad |= bool(diffs)
for line in open(f"{work}/remap.csv"):
    print("remapped rows:", line.strip())
sys.exit(bad)
EOF

echo "== 2. tests/gpu"
timeout "$STEP_TIMEOUT_S" "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider || failed=1

echo "== 3. each NVML call the agent makes: return type or error"
"$PYTHON" - <<'EOF' || failed=1
import re, pathlib, pynvml
calls = sorted({m for p in pathlib.Path("agent/gpu").glob("*.py")
                for m in re.findall(r"\b(nvml[A-Z]\w+)", p.read_text())})
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
args = {  # calls that take more than the handle
    "nvmlDeviceGetHandleByIndex": (0,), "nvmlDeviceGetMigDeviceHandleByIndex": (h, 0),
    "nvmlDeviceGetTemperature": (h, pynvml.NVML_TEMPERATURE_GPU),
    "nvmlDeviceGetTemperatureV": (h, pynvml.NVML_TEMPERATURE_GPU),
    "nvmlDeviceGetTotalEccErrors": (h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
    "nvmlDeviceGetRetiredPagesPendingStatus": (h,), "nvmlDeviceGetMemoryInfo": (h,),
}
for name in calls:
    fn = getattr(pynvml, name, None)
    if fn is None or not callable(fn):
        print(f"{name:45} {'(not a function: ' + type(fn).__name__ + ')' if fn is not None else 'MISSING in pynvml'}")
        continue
    if name in ("nvmlInit", "nvmlShutdown", "nvmlDeviceRegisterEvents"):
        print(f"{name:45} (not called here)"); continue
    a = args.get(name, () if name.startswith("nvmlSystem") or name == "nvmlDeviceGetCount" else (h,))
    try:
        value = fn(*a)
        print(f"{name:45} -> {type(value).__name__}: {str(value)[:60]}")
    except Exception as exc:
        print(f"{name:45} !! {type(exc).__name__}: {exc}")
try:  # the agent asks for v2 (used memory without the driver's reserve)
    v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    print(f"{'nvmlDeviceGetMemoryInfo(v2)':45} -> {type(v2).__name__}: used {v2.used >> 20} MiB")
except Exception as exc:
    print(f"{'nvmlDeviceGetMemoryInfo(v2)':45} !! {type(exc).__name__}: {exc}")
if hasattr(pynvml, "nvmlDeviceGetMinorNumber"):
    print(f"{'nvmlDeviceGetMinorNumber':45} -> {pynvml.nvmlDeviceGetMinorNumber(h)} (post-start check)")
pynvml.nvmlShutdown()
EOF

echo "== 4. a job container with one leased GPU"
if ! docker info >/dev/null 2>&1; then
    echo "skipped: no Docker engine"
else
    IMAGE=${GPU_CHECK_IMAGE:-$(docker images --format '{{.Repository}}:{{.Tag}}' \
        | grep -E '^(nvidia/cuda|nvcr.io|ubuntu|debian)' | head -1)}
    if [ -z "$IMAGE" ]; then
        echo "skipped: no local image with glibc (set GPU_CHECK_IMAGE; this script never pulls)"
    else
        timeout "$STEP_TIMEOUT_S" "$PYTHON" - "$IMAGE" <<'EOF' || failed=1
import os, subprocess, sys, tempfile
from pathlib import Path
from agent.runtime.base import ContainerSpec
from agent.runtime.docker import DockerRuntime
rt = DockerRuntime(os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
info = rt.info()
print("engine", info.version, "| GPU path:", info.gpu_path, "|", info.gpu_why)
if not info.gpu_support:
    sys.exit(0 if "not installed" in (info.gpu_why or "") else 1)
uuid = subprocess.check_output(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], text=True).split()[0]
with tempfile.TemporaryDirectory() as tmp:
    data, out = Path(tmp, "data"), Path(tmp, "out")
    data.mkdir(); out.mkdir(); os.chmod(tmp, 0o755); os.chmod(data, 0o755); os.chmod(out, 0o777)
    spec = ContainerSpec(job_id="gpu-check", node_id="gpu-check", image=sys.argv[1],
        image_id=rt.image_id(sys.argv[1], None) or "", command=["nvidia-smi", "-L"], env={},
        user="65534:65534", data_dir=data, model_dir=None, output_dir=out, cpus=1,
        memory_mib=1024, pids=64, tmp_mib=64, gpu_uuids=(uuid,))
    cid = rt.create(spec)
    try:
        rt.start(cid)  # the post-start device check runs here
        state = rt.wait(cid, 120)
        text = rt.logs(cid, 65536).decode(errors="replace")
    finally:
        rt.remove(cid)
print(text.strip())
listed = [line for line in text.splitlines() if line.startswith("GPU ")]
ok = state.exit_code == 0 and len(listed) == 1 and uuid in listed[0]
print("inside: exactly the leased GPU" if ok else f"inside: WRONG, leased {uuid}")
sys.exit(0 if ok else 1)
EOF
    fi
fi
echo "gpu-check: $([ $failed = 0 ] && echo ok || echo FAILED)"
exit $failed
