#!/usr/bin/env bash
# One GPU call runs every check and benchmark named on the command line, each under its own time
# limit, its output kept in $OUT/<name>.txt (the device tool brings $OUT back).
#
# Here, before the call: build the wheels the GPU machine installs (nothing can be installed there
# from a registry) and carry .whl:
#   python3 -m pip wheel -q --no-deps -w .whl . plugins/* examples/third_party_plugin examples/toy_two_scales
# Peers for the benchmarks only (torchao's wheel, fbgemm's Triton quantizer sources under
# .whl/peers) go in .whl too; they are never a dependency of any package here.
#
#   bash benchmarks/gpu_all.sh tests mx nvfp4 int4 quant peers model formats sync sass host
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/install.txt" 2>&1 || { echo "install failed"; tail -5 "$OUT/install.txt"; }
export PYTHONPATH=/tmp/site:$PWD/.whl/peers
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader | tee "$OUT/card.txt"

run() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name ($*)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - start)) s"
    tail -n "${TAIL:-40}" "$OUT/$name.txt"
}

for what in "$@"; do
    case $what in
        tests) run tests 90 python3 -m pytest -q -x -p no:cacheprovider tests/gpu ;;
        mx) run mx 90 python3 benchmarks/gpu_mx.py --quick ;;
        nvfp4) run nvfp4 110 python3 benchmarks/gpu_nvfp4.py --budget 80 ;;
        int4) run int4 150 python3 benchmarks/gpu_int4.py ;;
        int4-defaults) run int4_defaults 90 python3 benchmarks/gpu_int4.py --no-check --variants default,wt4 ;;
        quant) run quant 200 python3 benchmarks/gpu_grouped.py --sections check,quant ;;
        peers) run peers 45 python3 benchmarks/gpu_peers.py ;;
        model) run model 300 python3 benchmarks/gpu_grouped.py --sections model ;;
        formats) run formats 150 python3 benchmarks/gpu_model_formats.py --budget 120 ;;
        profile) run profile 150 python3 benchmarks/gpu_moving_profile.py ;;
        sync) run sync 120 python3 benchmarks/gpu_sync.py ;;
        # CPU only, but with the card's Triton (its ptxas) and the card's host CPU
        sass) run sass 45 python3 benchmarks/sass_check.py; run sass_nvfp4 45 python3 benchmarks/sass_nvfp4.py ;;
        host)
            run host_calls 60 python3 benchmarks/bench_call_overhead.py --calls 5000
            run host_step 60 python3 benchmarks/bench_step_host.py --layers 24 --reps 7
            ;;
        *) echo "unknown: $what" ;;
    esac
done
