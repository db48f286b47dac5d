#!/usr/bin/env bash
# Runs gpufleet's real training path (gpufleet.jobs.finetune: Ray Train TorchTrainer + DeepSpeed, torch.compile)
# on the GPU machine, full and LoRA, on a tiny random model; prints each job's layout, first/last metrics
# and the exported files. .whl/ must hold what the machine lacks (see ../shared/PLATFORM.md): Ray 2.60
# cp312 without jars/rllib as ray-2.60.0-slim.tar.xz, jsonschema, jsonschema-specifications, referencing,
# rpds-py, deepspeed-0.19.8.tar.gz, hjson, pydantic, pydantic-core, annotated-types, typing-inspection.
#   device: [WORKERS=2] bash bench/train/gpu_ray_job.sh   (carry .whl; WORKERS: GPUs, one worker each)
set -e
SITE=/tmp/site; t0=$(date +%s)
if [ ! -d $SITE/ray ]; then
  pip install -q --no-index --no-deps --target $SITE .whl/*.whl >/dev/null 2>&1
  mkdir -p /tmp/ds && tar xzf .whl/deepspeed-0.19.8.tar.gz -C /tmp/ds
  (cd /tmp/ds/deepspeed-0.19.8 && DS_BUILD_OPS=0 pip install -q --no-index --no-deps --no-build-isolation --target $SITE . >/dev/null 2>&1)
  tar xJf .whl/ray-2.60.0-slim.tar.xz -C $SITE
fi
export PATH=$SITE/bin:$PATH PYTHONPATH=$SITE:$PWD RAY_AUTH_MODE=disabled TORCH_CUDA_ARCH_LIST=9.0 PYTHONWARNINGS=ignore
echo install $(( $(date +%s)-t0 ))s
python -m gpufleet.jobs.tiny_model /tmp/tiny >/dev/null
for task in full lora; do
cat > /tmp/gpu-$task.yaml <<Y
name: gpu-$task
model: /tmp/tiny
dataset: $PWD/examples/data/greetings.jsonl
task: $task
learning_rate: $([ $task = full ] && echo 0.001 || echo 0.003)
warmup_steps: 5
max_steps: 40
global_batch: 8
seq_len: 128
checkpoint_every: 20
log_every: 10
gpu: H100-80GB
output_dir: /tmp/out-$task
plan: {workers: ${WORKERS:-1}}
Y
done
python - <<'P'
import json, os, ray
from gpufleet.jobs.finetune import TRAIN_ENV, run
env = {**TRAIN_ENV, **{k: os.environ[k] for k in ("PYTHONPATH", "TORCH_CUDA_ARCH_LIST", "PYTHONWARNINGS")}}
ray.init(runtime_env={"env_vars": env}, include_dashboard=False, logging_level="ERROR")
for task in ("full", "lora"):
    s = run(f"/tmp/gpu-{task}.yaml")
    lines = [json.loads(x) for x in open(f"/tmp/out-{task}/metrics.jsonl")]
    print(task, "layout", s["layout"])
    print(task, "first", {k: lines[0][k] for k in ("step", "loss")}, "last", {k: round(v, 4) if isinstance(v, float) else v for k, v in lines[-1].items()})
    print(task, "result", sorted(os.listdir(s["output"])))
    ck = s["checkpoint"]
    print(task, "checkpoint", ck, sorted(str(q.relative_to(ck)) for q in __import__("pathlib").Path(ck).rglob("*") if q.is_file()))
P
