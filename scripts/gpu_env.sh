# Sourced by the GPU scripts: the wheels carried in .whl/ (scripts/wheelhouse.py), then fusetune's
# own packages linked from this tree, so that a stale fusetune wheel in .whl/ never shadows the code.
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
rm -rf /tmp/site/fusetune /tmp/site/fusetune_kernels
ln -s "$PWD/src/fusetune" /tmp/site/fusetune
ln -s "$PWD/kernels" /tmp/site/fusetune_kernels
export PYTHONPATH=/tmp/site
