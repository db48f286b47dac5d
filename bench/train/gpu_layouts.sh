#!/usr/bin/env bash
# GPU machine: install Ray 2.60 + DeepSpeed 0.19.8 from a carried folder (see ../shared/PLATFORM.md: the slim Ray
# tarball, the wheels the image lacks, DeepSpeed's sdist, tok.tar.xz and build_model.py), then run
# bench/train/gpu_layouts.py with its arguments. Results land in $OUT (or /var/tmp/out). EXTRA_PYTHONPATH: more
# carried packages (bitsandbytes for qlora). With --phases first, runs bench/train/gpu_train.py instead (one process per
# case, no Ray: allocator peaks per phase and the host's pinned memory), with the remaining arguments; with --multigpu,
# bench/multigpu/layouts.py (several GPUs).
#   device: bash bench/train/gpu_layouts.sh .gpu/train --cases 8b-lora,resume
#   device: bash bench/train/gpu_layouts.sh .gpu/train --phases --model gemma-2-2b --cases full:2:ckpt:16:1:compile:offload
#   device: bash bench/train/gpu_layouts.sh .gpu/train --multigpu --cases 3b-full-z2-1gpu,3b-full-z2-2gpu,resume-2gpu
set -e
CARRY=$1; shift
SITE=/var/tmp/trainsite; t0=$(date +%s)
if [ ! -d $SITE/ray ]; then
  pip install -q --no-index --no-deps --target $SITE $CARRY/*.whl >/dev/null 2>&1
  mkdir -p /var/tmp/ds && tar xzf $CARRY/deepspeed-0.19.8.tar.gz -C /var/tmp/ds
  (cd /var/tmp/ds/deepspeed-0.19.8 && DS_BUILD_OPS=0 pip install -q --no-index --no-deps --no-build-isolation --target $SITE . >/dev/null 2>&1)
  tar xJf $CARRY/ray-2.60.0-slim.tar.xz -C $SITE
  mkdir -p /var/tmp/tok && tar xJf $CARRY/tok.tar.xz -C /var/tmp
fi
export PATH=$SITE/bin:$PATH PYTHONPATH=$SITE:$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH} RAY_AUTH_MODE=disabled TORCH_CUDA_ARCH_LIST=9.0 PYTHONWARNINGS=ignore
echo "install $(( $(date +%s)-t0 ))s; tokenizer: $(ls /var/tmp/tok | head -3 | tr '\n' ' ')"
if [ "$1" = --phases ]; then shift; exec python bench/train/gpu_train.py "$@"; fi
if [ "$1" = --multigpu ]; then  # several GPUs: bench/multigpu/layouts.py, NVLink multicast kept off
  shift; export NCCL_NVLS_ENABLE=0
  exec python -m bench.multigpu.layouts --out ${OUT:-/var/tmp/out} --tokenizer /var/tmp/tok --build $CARRY/build_model.py "$@"
fi
python bench/train/gpu_layouts.py --out ${OUT:-/var/tmp/out} --tokenizer /var/tmp/tok --build $CARRY/build_model.py "$@"
