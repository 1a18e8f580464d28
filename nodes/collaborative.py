"""Collaborative decoding node (CoDe): a large drafter samples the coarse scales, a small refiner the fine ones."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..models.core.hooks import SamplerHooks
from ..models.core.tokens import NextScaleTokens
from ..models.var.collaborative import check_collaborators, sample_collaborative
from ..models.var.model import VAR
from ..models.var.tokenizer import MultiScaleVQVAE
from .generator import NextScaleSampler, check_pair, class_choices, sampling_inputs, scale_callback
from .model_files import LoadedModel
from .sockets import CATEGORY, Control, Generator, KVPolicy, Tokenizer, Tokens
from .validation import check_combos

MAX_SCALES = 64
# The sampling inputs taken over from NextScale Sampler, same ids, widgets and tooltips.
SHARED_INPUTS = (
    "class_name", "seed", "cfg", "top_k", "top_p", "more_smooth", "batch_size", "class_list", "options", "guide",
)


def _ready(drafter: LoadedModel, refiner: LoadedModel) -> tuple[VAR, VAR]:
    """Both generators on the device together (one ``load_models_gpu`` call, so loading one cannot evict the other)."""
    patchers = [m.patcher for m in (drafter, refiner) if getattr(m, "patcher", None) is not None]
    if len(patchers) == 2:
        mm.load_models_gpu(list({id(p): p for p in patchers}.values()))
        return drafter.module, refiner.module
    return drafter.ready(), refiner.ready()


class NextScaleCollaborativeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        shared = {i.id: i for i in NextScaleSampler.define_schema().inputs}
        return io.Schema(
            node_id="NextScaleCollaborativeSampler",
            display_name="NextScale Collaborative Sampler",
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
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, class_name: str) -> bool | str:
        return check_combos(class_name=(class_name, class_choices()))

    @classmethod
    def execute(
        cls,
        drafter: LoadedModel,
        refiner: LoadedModel,
        tokenizer: LoadedModel,
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
    ) -> io.NodeOutput:
        draft_var, refine_var = _ready(drafter, refiner)
        vae: MultiScaleVQVAE = tokenizer.ready()
        check_pair(draft_var, vae, drafter, tokenizer)
        check_pair(refine_var, vae, refiner, tokenizer)
        check_collaborators(draft_var, refine_var, vae, draft_scales)
        labels_B, sampling, preview = sampling_inputs(
            refine_var, class_name, class_list, batch_size, cfg, top_k, top_p, more_smooth, options
        )
        B, device = len(labels_B), refiner.device
        patch_nums = refine_var.patch_nums
        same_model = draft_var is refine_var
        hooks = SamplerHooks(
            callback=scale_callback(cls.hidden.unique_id, vae, patch_nums, preview),
            guide=None if guide is None else guide.bind(vae, patch_nums, B, device),
            control=None if control is None else control.bind(refine_var, vae, B, device),
            kv_policy=None if kv_policy is None else kv_policy.bind(refine_var, B, device),
        )
        drafter_control = hooks.control if same_model else None
        drafter_kv_policy = None if kv_policy is None else kv_policy.bind(draft_var, B, device)
        tokens: NextScaleTokens = sample_collaborative(
            draft_var, refine_var, vae, labels_B, draft_scales=draft_scales, seed=seed, options=sampling,
            hooks=hooks, drafter_control=drafter_control, drafter_kv_policy=drafter_kv_policy, device=device,
        )
        return io.NodeOutput(tokens.to("cpu"))


NODES = [NextScaleCollaborativeSampler]
