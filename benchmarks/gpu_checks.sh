#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, for a session that is lent one.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [STEP ...]      STEP: env tests report scan train (default: all)
#
# The GPU machine has torch and triton but cannot reach a package registry: pure-Python wheels of what
# it lacks (flash-linear-attention, hydra-core, omegaconf, webdataset, ...) go in .whl/ beside this
# repository and are installed to a scratch folder first. The project itself is installed there too,
# so that kernels/ imports as defocus_scale.kernels. Each step has its own time limit, cut to what is
# left of GPU_CHECKS_BUDGET_S (default 470 s: the whole call stays under 8 minutes), and writes its log
# and JSON into OUT_DIR; a failing or timed-out step does not stop the next one.
set -u -o pipefail
deadline=$(( $(date +%s) + ${GPU_CHECKS_BUDGET_S:-470} ))
limit() {  # limit SECONDS: the step's own limit, or what is left of the budget if that is less
  local left=$(( deadline - $(date +%s) ))
  (( left < 1 )) && left=1
  echo $(( $1 < left ? $1 : left ))
}
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
      # the installed project imports whole (kernels and orchestration under defocus_scale)
      $py -c "import torch, triton, defocus_scale.kernels, defocus_scale.orchestration as o; \
print('torch', torch.__version__, 'triton', triton.__version__, 'project', o.__name__)" \
        | tee -a "$out/env.txt" ;;
    tests)  # the kernel, operator and model tests, compiled for the GPU (not interpreted)
      timeout $(limit 130) $py -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_ops.py \
        tests/test_models.py --junitxml "$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -40 ;;
    report)  # the ahead-of-time kernel report for this GPU's arch: its estimates sit beside the timings
      arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
      timeout $(limit 60) $py benchmarks/kernel_report.py --archs "sm_$arch" --json "$out/kernel_report.json" \
        2>&1 | tee "$out/kernel_report.log" | tail -5 ;;
    scan)  # our kernels beside the report's estimates, the PyTorch reference, mamba_ssm and fla where installed
      timeout $(limit 110) $py benchmarks/bench_scan.py --dtype bf16 --batch 128 --out "$out/bench_scan.json" \
        2>&1 | tee "$out/bench_scan.log" ;;
    train)  # trainer end to end on one GPU (NCCL, bf16), then the step-throughput benchmark
      timeout $(limit 90) $py -m defocus_scale.train model=defocus_mamba_small data.image_size=224 \
        data.batch_size=64 data.workers=8 trainer.device=cuda trainer.precision=bf16 trainer.compile=true \
        trainer.max_steps=30 \
        trainer.eval_every=30 trainer.checkpoint_every=30 trainer.log_every=10 trainer.progress=false \
        trainer.threads=null trainer.run_dir=/tmp/defocus-gpu-run 2>&1 | tee "$out/train_smoke.log" | tail -30
      timeout $(limit 80) $py benchmarks/bench_train.py --batch 64 --skip-1b --skip-memory \
        --out "$out/bench_train.json" 2>&1 | tee "$out/bench_train.log" | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S))"
