"""Collaborative decoding node (CoDe): a large drafter samples the coarse scales, a small refiner the fine ones."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..models.core.family import Workload
from ..models.core.hooks import SamplerHooks
from ..models.core.tokens import NextScaleTokens
from .generator import (
    NextScaleSampler,
    bind_images,
    bind_policy,
    check_pair,
    class_choices,
    framed_like_reference,
    refuse_hooks,
    sampling_inputs,
    scale_callback,
)
from .service import NextScaleModel, ready_batch, sub_batches
from .sockets import CATEGORY, Accel, Control, Generator, KVPolicy, Tokenizer, Tokens
from .validation import check_combos, check_numbers

MAX_SCALES = 64
# The sampling inputs taken over from NextScale Sampler, same ids, widgets and tooltips.
SHARED_INPUTS = (
    "class_name", "seed", "cfg", "top_k", "top_p", "more_smooth", "batch_size", "class_list", "options", "guide",
)


class NextScaleCollaborativeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        shared = {i.id: i for i in NextScaleSampler.define_schema().inputs}
        return io.Schema(
            node_id="NextScaleCollaborativeSampler",
            display_name="NextScale Collaborative Sampler (VAR)",
            category=CATEGORY,
            description="Collaborative decoding (CoDe): a large drafter generates the first draft_scales coarse "
            "scales, then a small refiner takes over for the fine scales, which hold most of the tokens. "
            "Training-free with official var_d30 + var_d16 (about 1.7x faster at 8 drafted scales, 2.9x at 6, "
            "on a GPU), or with the released fine-tuned drafter_N / refiner_N pairs. Same seeds and inputs as "
            "NextScale Sampler: with the same model as drafter and refiner it gives the same image.",
            inputs=[
                Generator.Input("drafter", tooltip="The large generator for the coarse scales (e.g. var_d30.pth or "
                                "drafter_8.pth), from NextScale Load Generator."),
                Generator.Input("refiner", tooltip="The small generator for the fine scales (e.g. var_d16.pth or "
                                "refiner_8.pth). Same tokenizer, schedule and classes as the drafter."),
                Tokenizer.Input("tokenizer", tooltip="The tokenizer both generators were trained with."),
                io.Int.Input(
                    "draft_scales",
                    default=8,
                    min=0,
                    max=MAX_SCALES,
                    tooltip="How many coarse scales the drafter generates (N). 0: the refiner alone; the number "
                    "of scales (10 for VAR 256 px): the drafter alone. CoDe: 8 keeps FID (1.95 -> 1.98), 6 is "
                    "fastest (FID 2.27); released fine-tuned pairs exist for 6, 7, 8 and 9.",
                ),
                *(shared[name] for name in SHARED_INPUTS),
                Control.Input(
                    "control",
                    optional=True,
                    tooltip="From a NextScale control node. Bound to the refiner (a control adapter belongs to one "
                    "model): it acts on the refined scales, and on the drafted ones too when drafter and "
                    "refiner are the same generator.",
                ),
                KVPolicy.Input(
                    "kv_policy",
                    optional=True,
                    tooltip="From a NextScale KV Policy node: what each model's KV cache keeps (bound to the "
                    "drafter and to the refiner separately; default: everything).",
                ),
                Accel.Input(
                    "accel",
                    optional=True,
                    tooltip="From NextScale Acceleration: token pruning, guidance stop and shortcut at the last "
                    "scales, on the refined scales after the first (default: off, the exact sampler).",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, class_name: str, cfg: float | None = None, top_p: float | None = None) -> bool | str:
        return check_combos(class_name=(class_name, class_choices())) or check_numbers(
            cls, cfg=cfg, top_p=top_p
        ) or True

    @classmethod
    def execute(
        cls,
        drafter: NextScaleModel,
        refiner: NextScaleModel,
        tokenizer: NextScaleModel,
        draft_scales: int,
        class_name: str,
        seed: int,
        cfg: float,
        top_k: int,
        top_p: float,
        more_smooth: bool,
        batch_size: int,
        class_list: str = "",
        options: dict | None = None,
        guide=None,
        control=None,
        kv_policy=None,
        accel=None,
    ) -> io.NodeOutput:
        check_pair(drafter, tokenizer)
        check_pair(refiner, tokenizer)  # both of the tokenizer's family, then
        family = refiner.family
        family.check_collaborators(drafter.module, refiner.module, tokenizer.module, draft_scales)
        refuse_hooks(family, guide, control, kv_policy, accel)
        labels_B, sampling, preview = sampling_inputs(
            refiner, class_name, class_list, batch_size, cfg, top_k, top_p, more_smooth, options
        )
        B, device = len(labels_B), refiner.device
        controls = [] if control is None else control.models()
        geometry = family.kv_geometry(refiner.module)
        scales, prefill = geometry.scales, sum(geometry.areas[: draft_scales + 1])
        draft_workload = Workload(
            guided=sampling.cfg != 0, dtype=drafter.compute_dtype, decode_dtype=tokenizer.compute_dtype
        )
        refine_workload = Workload(
            guided=sampling.cfg != 0, dtype=refiner.compute_dtype, step_tokens=prefill,
            controls=tuple(m.module for m in controls), decode_dtype=tokenizer.compute_dtype,
        )

        def need(images: int, spec=kv_policy):
            """The larger of the two models' runs: the drafter's cache is freed before the refiner's is filled."""
            draft = family.memory(drafter.module, tokenizer.module, dataclasses.replace(
                draft_workload, batch_size=images, kv_policy=bind_policy(spec, drafter)))
            refine = family.memory(refiner.module, tokenizer.module, dataclasses.replace(
                refine_workload, batch_size=images, kv_policy=bind_policy(spec, refiner)))
            return max(draft, refine, key=lambda n: n.working)

        size = ready_batch(drafter, refiner, tokenizer, *controls, batch=B, need=need,
                           what="NextScale Collaborative Sampler (VAR)")
        same_model = drafter.module is refiner.module
        parts = []
        for start, stop in sub_batches(B, size):
            hooks = SamplerHooks(
                callback=scale_callback(cls.hidden.unique_id, tokenizer, len(scales), preview),
                **bind_images(guide, control, start, stop, B, refiner, tokenizer, scales),
                kv_policy=bind_policy(kv_policy, refiner),
                accel=accel,
            )
            drafter_hooks = SamplerHooks(
                control=hooks.control if same_model else None, kv_policy=bind_policy(kv_policy, drafter)
            )
            parts.append(family.sample_collaborative(
                drafter.module, refiner.module, tokenizer.module, labels_B[start:stop], draft_scales=draft_scales,
                seed=seed + start, options=sampling, hooks=hooks, drafter_hooks=drafter_hooks, device=device,
            ))
        tokens = NextScaleTokens.cat(parts)
        return io.NodeOutput(framed_like_reference(tokens, guide).to("cpu"))


NODES = [NextScaleCollaborativeSampler]
