#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a session that is lent one.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [STEP ...]      STEP: env tests report scan train (default: all)
#
# The GPU machine has torch and triton but cannot reach a package registry: pure-Python wheels of what
# it lacks (flash-linear-attention, hydra-core, omegaconf, webdataset, ...) go in .whl/ beside this
# repository and are installed to a scratch folder first. The project itself is installed there too,
# so that kernels/ imports as defocus_scale.kernels. Each step has its own time limit and writes its
# log and JSON into OUT_DIR; a failing step does not stop the next one.
set -u -o pipefail
out=$(realpath -m "${1:?usage: gpu_checks.sh OUT_DIR [STEP ...]}")
shift
steps=${*:-env tests report scan train}
mkdir -p "$out"
site=$(mktemp -d /tmp/defocus-site.XXXX)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . \
  || { echo "could not install the project"; exit 1; }
export PYTHONPATH=$site PYTHONUNBUFFERED=1
# -P: the repository root must not shadow the installed package (its defocus_scale/ lacks kernels/).
py="python3 -P"

for step in $steps; do
  echo "=== $step ($(date -u +%H:%M:%S))"
  case $step in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/env.txt"
      $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee -a "$out/env.txt" ;;
    tests)  # the kernel, operator and model tests, compiled for the GPU (not interpreted)
      timeout 240 $py -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_ops.py \
        tests/test_models.py --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -40 ;;
    report)  # the ahead-of-time kernel report for this GPU's arch: its estimates sit beside the timings
      arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
      timeout 240 $py benchmarks/kernel_report.py --archs "sm_$arch" --json "$out/kernel_report.json" \
        2>&1 | tee "$out/kernel_report.log" | tail -5 ;;
    scan)
      timeout 300 $py benchmarks/bench_scan.py --dtype bf16 --batch 64 128 --out "$out/bench_scan.json" \
        2>&1 | tee "$out/bench_scan.log" ;;
    train)  # trainer end to end on one GPU (NCCL, bf16), then the step-throughput benchmark
      timeout 150 $py -m defocus_scale.train model=defocus_mamba_small data.image_size=224 \
        data.batch_size=64 data.workers=8 trainer.device=cuda trainer.precision=bf16 trainer.compile=true \
        trainer.max_steps=30 \
        trainer.eval_every=30 trainer.checkpoint_every=30 trainer.log_every=10 trainer.progress=false \
        trainer.threads=null trainer.run_dir=/tmp/defocus-gpu-run 2>&1 | tee "$out/train_smoke.log" | tail -30
      timeout 200 $py benchmarks/bench_train.py --batch 64 --skip-1b --skip-memory \
        --out "$out/bench_train.json" 2>&1 | tee "$out/bench_train.log" | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S))"
