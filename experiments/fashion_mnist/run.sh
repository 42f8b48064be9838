#!/usr/bin/env bash
# The Fashion-MNIST multi-label experiment of docs/ANALYSIS.md, run from the repository root:
#
#   apt-get install dataset-fashion-mnist      # the IDX files under /usr/share/datasets/fashion-mnist
#   bash experiments/fashion_mnist/run.sh      # about 15 min of CPU; re-running skips what is done
#
# Paths can be moved with DATA, VOC, FEATS, MAPS and RUNS (e.g. DATA=/tmp/fm/data ... bash run.sh).
# Steps: build the VOC tree -> ingest voc --classes -> EfficientNet-Lite0 features (ImageNet weights,
# 224 px; pooled, and the 7 x 7 maps for BoostLU) -> heads on cached features: the delta_rel sweep of LL-Ct
# (Figure 5), the methods with 3 seeds (the paper's and the follow-up methods of the README) and the
# memorisation tracker + precision of modification on (Tables 1 and 2, Figure 4), the training fraction sweep
# (Figure 6) -> pointing game (Table 4) -> report tables and figures.
set -euo pipefail

DATA=${DATA:-data/fmnist}
VOC=${VOC:-data/fmnist_voc}
FEATS=${FEATS:-data/fmnist_feats}
MAPS=${MAPS:-data/fmnist_maps}
RUNS=${RUNS:-runs/fmnist}
CONFIG=experiments/fashion_mnist/fmnist.yaml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the heads are tiny; one thread is the most efficient

[ -f "$VOC/classes.txt" ] || python experiments/fashion_mnist/build_voc.py --out "$VOC" --n-train 4000 --n-test 1000 --seed 0
[ -f "$DATA/manifest.json" ] || python -m largeloss.ingest voc --root "$VOC/VOCdevkit" --folder FMNIST --classes "$VOC/classes.txt" \
    --dataset fashion_mnist_ml --out "$DATA" --workers 2 --no-progress
for split in train test; do
    # batches of 4 on CPU: larger ones spend more time in page faults than in convolutions
    [ -f "$FEATS/$split.json" ] || python -m largeloss.train.features extract --data "$DATA" --split "$split" \
        --arch efficientnet_lite0 --weights IMAGENET --image-size 224 --batch-size 4 --out "$FEATS/$split.npy" --no-progress
    # the unpooled maps (N, 1280, 7, 7) for BoostLU's class activation maps
    [ -f "$MAPS/$split.json" ] || python -m largeloss.train.features extract --data "$DATA" --split "$split" \
        --arch efficientnet_lite0 --weights IMAGENET --image-size 224 --batch-size 4 --pooling none \
        --out "$MAPS/$split.npy" --no-progress
done

# Figure 5: LL-Ct against delta_rel (the value used below was chosen on its validation mAP)
python -m largeloss.train.sweep --features-dir "$FEATS" --config "$CONFIG" --methods ll_ct --grid delta_rel=0.2,0.5,1,2,4 \
    --seeds 0 1 2 --out "$RUNS/fig5" data="$DATA"
# Tables 1 and 2, Figure 4: the methods, 3 seeds, analyses on; the follow-up methods with their authors'
# defaults (BoostLU on the feature maps)
python -m largeloss.train.sweep --features-dir "$FEATS" --config "$CONFIG" \
    --methods full an ll_r ll_ct ll_cp partial_bce em em_apl gr_loss role \
    --seeds 0 1 2 --out "$RUNS/table2" data="$DATA" analysis_entries=3000
python -m largeloss.train.sweep --features-dir "$MAPS" --config "$CONFIG" --methods boostlu_ll_r boostlu_ll_ct boostlu_ll_cp \
    --seeds 0 1 2 --out "$RUNS/table2" data="$DATA" analysis_entries=3000
# Partial-BCE in its own setting (partial labels) and BoostLU's boost at equal delta_rel (docs/ANALYSIS.md)
python -m largeloss.train.sweep --features-dir "$FEATS" --config "$CONFIG" --methods an iu partial_bce \
    --seeds 0 1 2 --out "$RUNS/partial" data="$DATA" protocol=partial:0.1
python -m largeloss.train.sweep --features-dir "$MAPS" --config "$CONFIG" --methods boostlu_ll_r boostlu_ll_ct boostlu_ll_cp \
    --grid boost_alpha=1 --seeds 0 1 2 --out "$RUNS/boost_ablation" data="$DATA"
# Figure 6: fewer training images
python -m largeloss.train.sweep --features-dir "$FEATS" --config "$CONFIG" --methods full an ll_ct --grid train_fraction=0.1,0.2,0.5,1.0 \
    --seeds 0 1 2 --out "$RUNS/fig6" data="$DATA"
# Table 4: pointing game of the Table 2 runs (one backbone pass serves every head)
python -m largeloss.train.pointing "$RUNS/table2" --batch-size 4 --overlays 6

python -m largeloss.eval.report "$RUNS/table2" --plot-precision "$RUNS/precision.png" --plot "$RUNS/val_map.png" --json "$RUNS/table2.json"
python -m largeloss.eval.report "$RUNS/fig5" --sweep delta_rel --plot-sweep "$RUNS/fig5.png"
python -m largeloss.eval.report "$RUNS/fig6" --sweep train_fraction --plot-sweep "$RUNS/fig6.png"
python -m largeloss.eval.report "$RUNS/partial"
python -m largeloss.eval.report "$RUNS/boost_ablation" --sweep boost_alpha
