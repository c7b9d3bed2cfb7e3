"""Evaluate a backbone: 1:1 verification on .bin pair sets, IJB-B/C TAR@FAR, jax.export of the embedding.

Demo (after `python -m data.prepare orl --out runs/demo/data` and the tiny fine-tuning run
`python main.py --config configs/finetune.py:tiny --workdir runs/finetune_tiny`):

    python main.py --config configs/evaluate.py --workdir runs/finetune_tiny

reads runs/finetune_tiny/backbone, scores runs/demo/data/test.bin, exports
runs/finetune_tiny/embedding.jaxexport and writes verification.{md,json} and evaluate.json there.

Full benchmarks (official protocol: flip-sum, 10 folds; IJB N1D1F1):

    python main.py --config configs/evaluate.py:full --workdir runs/ft_wf4m \
        --config.evaluate.bins="('/data/ms1m-retinaface-t1/lfw.bin','/data/ms1m-retinaface-t1/cfp_fp.bin','/data/ms1m-retinaface-t1/agedb_30.bin')" \
        --config.evaluate.ijbb_root=/data/IJB_release/IJBB --config.evaluate.ijbc_root=/data/IJB_release/IJBC

Expected numbers, TAR@FAR=1e-4 in %, as reported in the official LAFS README (not reproduced here, no GPU or data): Part fViT on MS1MV3: IJB-C 97.29; Part fViT on
WebFace4M: IJB-B 96.05, IJB-C 97.40; LAFS-pretrained then fine-tuned on WebFace4M: IJB-B 96.28,
IJB-C 97.58. The LAFS evaluation scripts feed x/255 - 0.5, and `python -m lafs_jax.convert --kind
part_fvit` records '[-0.5,0.5]' in the converted weights' metadata, so the default here reproduces
them; the models trained on [-1, 1], and whether the released numbers used x/255 - 0.5 is not
certain (the official evaluation scripts): `--config.evaluate.normalization='[-1,1]'` tries the other range.
"""
import ml_collections

from lafs_jax.config import base_config

DEMO_DATA = "runs/demo/data"  # where `python -m data.prepare orl --out runs/demo/data` writes


def get_config(arg=None):
    """arg: None or 'tiny' (the ORL demo .bin) | 'full' (no default data paths; give them on the command line)."""
    variant = arg or "tiny"
    if variant not in ("tiny", "full"):
        raise ValueError(f"configs/evaluate.py: unknown variant {variant!r}; use 'tiny' or 'full'")
    c = base_config()
    c.task = "evaluate"
    e = c.evaluate = ml_collections.ConfigDict()
    # Backbone variables directory (fine-tuning's WORKDIR/backbone or `python -m lafs_jax.convert --out`);
    # '' = WORKDIR/backbone of this run.
    e.checkpoint = ""
    # Verification pair sets (.bin: LFW, CFP-FP, AgeDB-30, ...); each scored by 10-fold accuracy.
    e.bins = (f"{DEMO_DATA}/test.bin",) if variant == "tiny" else ()
    e.flip = True  # embedding = emb(image) + emb(mirrored image) ("Accuracy-Flip"), also the exported function's
    e.nfolds = 10  # folds of the verification protocol
    e.batch_size = 64 if variant == "tiny" else 512  # images per device call, rounded up to the device count
    # Input overrides; '' = what the checkpoint's metadata records (what training used).
    e.normalization = ""  # '' | '[-1,1]' (x/255*2-1) | '[-0.5,0.5]' (x/255-0.5, the official eval scripts)
    e.color_order = ""  # '' | 'rgb' | 'bgr': channel order the model is fed, relative to the decoded RGB images
    # IJB 1:1 protocol: folders holding meta/{ijbb|ijbc}_*.txt and loose_crop/ ('' = skip).
    e.ijbb_root = ""
    e.ijbc_root = ""
    e.use_flip_test = True  # IJB: sum the features of the image and its mirror (F1)
    e.use_norm_score = True  # IJB: keep the feature norms, no per-image L2 normalisation (N1)
    e.use_detector_score = True  # IJB: multiply each image feature by its faceness score (D1)
    e.ijb_workers = 0 if variant == "tiny" else 8  # Grain worker processes decoding and aligning IJB images
    # IJB 1:N identification on the same template features (meta/{t}_1N_gal_{G1,G2|S1,S2}.csv and
    # {t}_1N_probe_mixed.csv needed): rank-1/5/10 and TPIR@FPIR=1e-2, 1e-1 (lafs_jax.eval.ijb)
    e.ijb_identification = False
    # Export the embedding function (uint8 RGB [b,H,W,3] -> f32 [b,D], batch symbolic) to
    # WORKDIR/embedding.jaxexport and check the reloaded function against the embedder.
    e.export = True
    c.lock()
    return c
