"""DINO-face's pretraining objective: the hooks `lafs_jax.train.ssl`'s teacher-student step calls.

Student and teacher are TokenViT + DINOHead, params `{'backbone': {'vit': ...}, 'head': ...}` (the
teacher starts as a copy and follows the student by EMA, momentum `dino.teacher_momentum` cosine to
`dino.teacher_momentum_end`). Views: grid tokens of the multi-crop crops (2 global + L local), FViT's
patchify kept apart from its TokenViT so every view group goes through one TokenViT call. Teacher:
logits of the global views (dropout / drop-path on with `dino.teacher_train_mode`, the official LAFS
quirk) and the temperature of the step (linear warmup over `dino.warmup_teacher_temp_epochs`). Loss:
the DINO cross-entropy (`lafs_jax.losses.dino`, centring `dino.centering`), plus `dino.koleo_weight` x
KoLeo of the student's global-view embeddings. Extra state: the centre `center` f32[K], an EMA of the
teacher logits' global-batch mean. Evaluation and export: the teacher's TokenViT as an FViT
(`{'params': {'vit': ...}}`), its variables directory `{'params': <TokenViT params>}`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lafs_jax.input import device_augment
from lafs_jax.input import pipelines
from lafs_jax.losses import dino as dino_lib
from lafs_jax.methods.dino import config as dino_config
from lafs_jax.models import presets
from lafs_jax.models import vit as vit_lib


def grid_views(images: jax.Array, patch_size: int) -> jax.Array:
    """Crops [B, V, S, S, C] -> grid tokens [B, V, (S/P)², P·P·C] in FViT's layout (row-major patches,
    (row, col, channel) vectors); V = 0 gives an empty [B, 0, 0, 0]."""
    b, v = images.shape[:2]
    if v == 0:
        return images.reshape(b, 0, 0, 0)
    tokens = vit_lib.patchify(images.reshape(b * v, *images.shape[2:]), patch_size)
    return tokens.reshape(b, v, *tokens.shape[1:])


class Objective:
    """DINO-face (the fViT multi-crop baseline of the LAFS paper). `lafs_jax.methods.lafs` subclasses it
    with landmark views and the frozen landmark CNN.

    Built from a pretraining recipe; `steps_per_epoch` sets the teacher temperature warmup in steps.
    """

    name = "dino"
    validate = staticmethod(dino_config.validate)

    def __init__(self, config: ml_collections.ConfigDict, *, steps_per_epoch: int = 1, total_steps: int = 1):
        del total_steps  # the step owns the momentum schedule
        self.config = config
        self.model = presets.with_precision(config.model, config.precision)  # compute dtype; params fp32
        self.vit = presets.build_token_vit(self.model)
        self.head = presets.build_dino_head(self.model)
        self.patch_size = int(self.model.patch_size)
        self.steps_per_epoch = int(steps_per_epoch)
        d = config.dino
        self.momentum = (float(d.teacher_momentum), float(d.teacher_momentum_end))

    # -- data -------------------------------------------------------------------------------------

    def batches(self, source, *, batch_size: int, seed: int):
        """The host pipeline of this method (a Grain iterator of per-process batches)."""
        return pipelines.dino_batches(source, self.config.data, batch_size=batch_size, seed=seed)

    def view_batch_shapes(self, batch_size: int) -> dict:
        """ShapeDtypeStructs of the host pipeline's view batch (augment_on='host'), without 'label'."""
        d = self.config.data.dino
        return {"global": jax.ShapeDtypeStruct((batch_size, d.global_crops, d.global_size, d.global_size, 3),
                                               jnp.float32),
                "local": jax.ShapeDtypeStruct((batch_size, d.local_crops, d.local_size, d.local_size, 3),
                                              jnp.float32)}

    def augment(self, key: jax.Array, batch: dict) -> dict:
        """Decoded uint8 batch -> the host pipeline's view batch, made on the device."""
        return device_augment.dino_views(self.config.data, key, batch)

    # -- state ------------------------------------------------------------------------------------

    def num_tokens(self) -> int:
        """Tokens of a global view (the student's init shape)."""
        return presets.grid_tokens(self.config.model)

    def init_student(self, key: jax.Array) -> dict:
        """{'params': {'backbone': {'vit': TokenViT params}, 'head': DINOHead params}}, float32."""
        k_vit, k_head = jax.random.split(key)
        m = self.config.model
        tokens = jnp.zeros((1, self.num_tokens(), m.patch_size ** 2 * m.channels), jnp.float32)
        vit = self.vit.init({"params": k_vit}, tokens, train=False)["params"]
        head = self.head.init({"params": k_head}, jnp.zeros((1, m.dim), jnp.float32))["params"]
        return {"params": {"backbone": {"vit": vit}, "head": head}}

    def teacher_params(self, student: Any) -> Any:
        """The part of the student the teacher averages: all of it."""
        return student

    def load_resources(self, workdir: str) -> Any:
        """Host arrays the extra state starts from (none)."""
        del workdir
        return None

    def init_extra_state(self, key: jax.Array, resources: Any = None) -> dict:
        """{'center': zeros [K]}."""
        del key, resources
        return {"center": jnp.zeros((self.config.model.dino_head.out_dim,), jnp.float32)}

    # -- the step ---------------------------------------------------------------------------------

    def views(self, state: dict, batch: dict, key: jax.Array) -> dict:
        """{'global': [B, G, N, T], 'local': [B, L, n, T]} grid tokens, batch-major."""
        del state, key
        return {"global": grid_views(batch["global"], self.patch_size),
                "local": grid_views(batch["local"], self.patch_size)}

    def logits(self, params: dict, views: dict, key: jax.Array, train: bool,
               names: tuple[str, ...] = ("global", "local"), with_embeddings: bool = False):
        """logits [B, V, K] of the views `names` (in that order), multi-crop style; with `with_embeddings`,
        (logits, backbone embeddings [B, V, D]).

        The backbone runs once per view group (groups differ in token count); the head runs once on the
        concatenated embeddings, as DINO's MultiCropWrapper.
        """
        embeddings = []
        for i, name in enumerate(n for n in names if n in views and views[n].shape[1] > 0):
            tokens = views[name]
            b, v = tokens.shape[:2]
            emb = self.vit.apply({"params": params["backbone"]["vit"]}, tokens.reshape(b * v, *tokens.shape[2:]),
                                 train=train, rngs={"dropout": jax.random.fold_in(key, i)} if train else None)
            embeddings.append(emb.reshape(b, v, -1))
        emb = jnp.concatenate(embeddings, axis=1)
        b, v, d = emb.shape
        logits = self.head.apply({"params": params["head"]}, emb.reshape(b * v, d)).reshape(b, v, -1)
        return (logits, emb) if with_embeddings else logits

    def teacher_temp(self, step: jax.Array) -> jax.Array:
        d = self.config.dino
        return dino_lib.teacher_temp_at(step, steps_per_epoch=self.steps_per_epoch, warmup_temp=d.warmup_teacher_temp,
                                        final_temp=d.teacher_temp, warmup_epochs=d.warmup_teacher_temp_epochs)

    def teacher_outputs(self, teacher: dict, views: dict, state: dict, key: jax.Array) -> dict:
        """{'logits': [G, B, K] of the global views, 'temp': the step's teacher temperature}."""
        logits = self.logits(teacher, views, key, train=self.config.dino.teacher_train_mode, names=("global",))
        return {"logits": jnp.swapaxes(logits, 0, 1), "temp": self.teacher_temp(state["step"])}

    def loss(self, student: dict, views: dict, teacher_out: dict, state: dict, key: jax.Array):
        """(DINO loss [+ koleo_weight x KoLeo], metrics)."""
        d = self.config.dino
        teacher_logits = teacher_out["logits"]
        student_out, emb = self.logits(student, views, key, train=True, with_embeddings=True)
        loss, aux = dino_lib.dino_loss(jnp.swapaxes(student_out, 0, 1), teacher_logits, state["center"],
                                       student_temp=d.student_temp, teacher_temp=teacher_out["temp"],
                                       centering=d.centering, sinkhorn_iterations=d.sinkhorn_iterations)
        if d.koleo_weight > 0:  # on the student's backbone embeddings of each global view, over the batch
            koleo = jnp.mean(jnp.stack([dino_lib.koleo_loss(emb[:, g]) for g in range(teacher_logits.shape[0])]))
            aux = dict(aux, dino_loss=loss, koleo=koleo)
            loss = loss + d.koleo_weight * koleo
        return loss, dict(aux, teacher_temp=teacher_out["temp"])

    def update_state(self, state: dict, teacher_out: dict) -> dict:
        """The centre's EMA of this step's teacher logits (global batch)."""
        return {"center": dino_lib.update_center(state["center"], teacher_out["logits"],
                                                 self.config.dino.center_momentum)}

    # -- evaluation and export --------------------------------------------------------------------

    def eval_model(self) -> Any:
        """The backbone the teacher is evaluated as: an FViT over its TokenViT."""
        return presets.build_model(self.model)

    def eval_variables(self, state: dict) -> dict:
        return {"params": {"vit": state["teacher"]["backbone"]["vit"]}}

    def export_variables(self, state: dict) -> dict:
        """The teacher backbone's variables directory: {'params': <TokenViT params at the root>}."""
        return {"params": state["teacher"]["backbone"]["vit"]}

    def export_metadata(self) -> dict:
        """What fine-tuning reads to load the export (into its model's `vit`)."""
        return {"kind": "token_vit", "patch_order": presets.patch_order(self.config.model)}
