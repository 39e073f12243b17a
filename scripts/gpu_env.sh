# Sourced by the GPU scripts: the wheels carried in .whl/ (scripts/wheelhouse.py), then fusetune's
# own packages linked from this tree, so that a stale fusetune wheel in .whl/ never shadows the code.
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=disabled
# Once per set of wheels: a second script of the same call (run beside the first) finds them installed.
WHEELS_STAMP=$(ls -l .whl/*.whl | md5sum)
if [ "$(cat /tmp/site/.wheels-stamp 2>/dev/null)" != "$WHEELS_STAMP" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  echo "$WHEELS_STAMP" >/tmp/site/.wheels-stamp
fi
# Linked once: a script started beside another must not pull the link from under it.
link_once() { [ "$(readlink "/tmp/site/$1")" = "$2" ] || { rm -rf "/tmp/site/$1" && ln -s "$2" "/tmp/site/$1"; }; }
link_once fusetune "$PWD/src/fusetune"
link_once fusetune_kernels "$PWD/kernels"
link_once fusetune_cli "$PWD/src/fusetune_cli"
link_once hydra_plugins/fusetune_launcher "$PWD/src/hydra_plugins/fusetune_launcher"  # beside the launchers' plugins
export PYTHONPATH=/tmp/site
