"""KV-cache nodes: a policy for NextScale Sampler's ``kv_policy`` input, calibration, and a memory/fidelity report."""

from __future__ import annotations

import dataclasses
import os
import re

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.infinity.sampler import InfinityOptions, TextCondition
from ..models.infinity.schedule import InfinitySchedule
from ..models.kv.policies import POLICIES, KVPolicySpec
from ..models.kv.profile import KVProfile, calibrate, record_profile
from ..models.kv.report import KVReport, kv_report
from ..models.var.classes import class_index, parse_class_list
from ..models.var.sampler import SamplingOptions
from .generator import check_pair
from .infinity import ASPECTS, RESOLUTION_CHOICES, check_levels, check_run_settings, text_from_conditioning
from .service import NextScaleModel, ready_batch, sub_batches
from .sockets import CATEGORY, Generator, InfinityModel, KVPolicy, Tokenizer
from .sockets import KVProfile as KVProfileSocket
from .validation import check_combos, check_numbers

KV_CATEGORY = f"{CATEGORY}/kv"
PROFILE_DIR = "nextscale_kv"


def profile_path(name: str) -> str:
    """A profile file named relative to ComfyUI's output folder (or absolute)."""
    return name if os.path.isabs(name) else os.path.join(folder_paths.get_output_directory(), name)


def filename_input(default: str) -> io.String.Input:
    """The calibration nodes' ``filename`` input."""
    return io.String.Input("filename", default=default, optional=True,
                           tooltip="Name of the JSON file written to output/nextscale_kv/ (empty: do not save).")


def profile_outputs() -> list:
    """The calibration nodes' outputs: the profile and the path it was saved to."""
    return [KVProfileSocket.Output("profile", display_name="profile"), io.String.Output("path", display_name="path")]


def save_profile(profile: KVProfile, filename: str) -> str:
    """``profile`` saved as ``output/nextscale_kv/<filename>.json`` (the name made file-safe); "" for no name."""
    if not filename.strip():
        return ""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", filename.strip()).removesuffix(".json")
    return profile.save(os.path.join(folder_paths.get_output_directory(), PROFILE_DIR, stem + ".json"))


def progress(node_id, total: int):
    """The calibration callback: a progress bar over every scale of every sample, honouring interrupts."""
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_scale(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)

    return on_scale


class NextScaleKVPolicy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleKVPolicy",
            display_name="NextScale KV Policy",
            category=KV_CATEGORY,
            description="What the sampler's KV cache keeps from one scale to the next. 'full' keeps everything "
            "(exact). The others keep 'budget' of the sequence per layer and head: 'recent' the latest tokens and "
            "'strided' evenly spaced ones (naive baselines); 'scalekv' gives more memory to the layers that look at "
            "the whole picture (its 'drafter' layers) and keeps the tokens the current scale attends to most; "
            "'hack' gives structural heads a large budget (first "
            "scales, current scale, best middle tokens) and contextual heads a small one. ScaleKV and HACK need a "
            "profile from NextScale KV Calibrate (without one they use uniform budgets). Connect to NextScale "
            "Sampler's 'kv_policy'.",
            inputs=[
                io.Combo.Input("policy", options=list(POLICIES), default="scalekv",
                               tooltip="full: exact cache. recent / strided: baselines. scalekv / hack: "
                               "calibrated compression (connect a profile)."),
                io.Float.Input("budget", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the whole token sequence each layer and head carries between "
                               "scales (on average). 1 = exact full cache. Memory falls in proportion."),
                KVProfileSocket.Input("profile", optional=True,
                                      tooltip="From NextScale KV Calibrate, for scalekv and hack."),
                io.String.Input("profile_file", default="", optional=True,
                                tooltip="Instead of the socket: a profile JSON saved by NextScale KV Calibrate, "
                                "relative to ComfyUI's output folder (e.g. nextscale_kv/profile.json) or absolute."),
                io.Int.Input("drafters", default=1, min=0, max=64, optional=True,
                             tooltip="ScaleKV: how many layers per scale look at the whole picture and so keep more "
                             "memory (drafter layers: lowest attention selectivity); they get the "
                             "budget the refiners give up."),
                io.Float.Input("decay", default=0.4, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="ScaleKV: refiner budget decay; at the last scale refiners keep (1 - decay) "
                               "of the budget."),
                io.Float.Input("contextual_fraction", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="HACK: fraction of heads treated as contextual (lowest attention variance)."),
                io.Float.Input("contextual_ratio", default=0.25, min=0.01, max=1.0, step=0.01, optional=True,
                               tooltip="HACK: a contextual head's budget relative to a structural head's."),
            ],
            outputs=[KVPolicy.Output("kv_policy", display_name="kv_policy")],
        )

    @classmethod
    def validate_inputs(
        cls, policy: str, budget: float | None = None, decay: float | None = None,
        contextual_fraction: float | None = None, contextual_ratio: float | None = None,
    ) -> bool | str:
        return check_combos(policy=(policy, POLICIES)) or check_numbers(
            cls, budget=budget, decay=decay, contextual_fraction=contextual_fraction,
            contextual_ratio=contextual_ratio,
        ) or True

    @classmethod
    def execute(
        cls,
        policy: str,
        budget: float,
        profile: KVProfile | None = None,
        profile_file: str = "",
        drafters: int = 1,
        decay: float = 0.4,
        contextual_fraction: float = 0.5,
        contextual_ratio: float = 0.25,
    ) -> io.NodeOutput:
        if profile is None and profile_file.strip():
            profile = KVProfile.load(profile_path(profile_file.strip()))
        spec = KVPolicySpec(policy, budget, profile, drafters, decay, contextual_fraction, contextual_ratio)
        return io.NodeOutput(spec)


class NextScaleKVCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleKVCalibrate",
            display_name="NextScale KV Calibrate",
            category=KV_CATEGORY,
            description="Samples a few images with the full cache and records the attention statistics ScaleKV "
            "(drafter layers) and HACK (head types) need. Saves the profile as JSON under ComfyUI's output folder "
            "(nextscale_kv/) and returns it for NextScale KV Policy. A few samples are enough.",
            inputs=[
                Generator.Input("generator", tooltip="From NextScale Load Generator."),
                Tokenizer.Input("tokenizer", tooltip="The generator's tokenizer."),
                io.Int.Input("samples", default=4, min=1, max=64,
                             tooltip="Images to sample (classes 0, 1, ... unless class_list is set)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the first image."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance while sampling."),
                io.String.Input("class_list", default="", optional=True,
                                tooltip="Optional comma-separated classes (names or indices), cycled to 'samples'."),
                filename_input("nextscale_kv_profile"),
            ],
            outputs=profile_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg: float) -> bool | str:
        return check_numbers(cls, cfg=cfg) or True

    @classmethod
    def execute(cls, generator: NextScaleModel, tokenizer: NextScaleModel, samples: int, seed: int, cfg: float,
                class_list: str = "", filename: str = "nextscale_kv_profile") -> io.NodeOutput:
        check_pair(generator, tokenizer)
        family = generator.family
        names = family.class_names(generator.module)
        classes = parse_class_list(class_list, names) or list(range(min(samples, len(names))))
        labels = [classes[i % len(classes)] for i in range(samples)]
        workload = Workload(batch_size=1, guided=cfg != 0, dtype=generator.compute_dtype,
                            decode_dtype=tokenizer.compute_dtype)
        # one image per run, with the full cache whose attention it records: only the refusal can apply
        ready_batch(generator, tokenizer, batch=1, what="NextScale KV Calibrate", kv_settings=False,
                    need=lambda images, spec=None: family.memory(generator.module, tokenizer.module, workload))
        num_scales = len(family.kv_geometry(generator.module).scales)
        on_scale = progress(cls.hidden.unique_id, len(labels) * num_scales)
        profile = calibrate(generator.module, tokenizer.module, labels, seed, SamplingOptions(cfg=cfg),
                            generator.device, callback=on_scale, family=family)
        profile.meta["generator"] = getattr(generator, "name", "")
        return io.NodeOutput(profile, save_profile(profile, filename))


class NextScaleKVCalibrateText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleKVCalibrateText",
            display_name="NextScale KV Calibrate (Text)",
            category=KV_CATEGORY,
            description="NextScale KV Calibrate for Infinity models: samples a few images of a prompt with the full "
            "cache at one resolution and aspect ratio and records the attention statistics ScaleKV (drafter layers) "
            "and HACK (head types) need. Saves the profile as JSON under ComfyUI's output folder (nextscale_kv/) "
            "and returns it for NextScale KV Policy. A profile fits the resolution and aspect ratio it was made at.",
            inputs=[
                InfinityModel.Input("model", tooltip="From NextScale Load Infinity."),
                Tokenizer.Input("tokenizer", tooltip="The BSQ tokenizer from NextScale Load Infinity."),
                io.Conditioning.Input("positive", tooltip="A prompt, from NextScale Text Encode (T5)."),
                io.Int.Input("samples", default=4, min=1, max=64, tooltip="Images to sample (seeds seed, seed + 1, "
                             "...)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the first image."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance while sampling."),
                io.Float.Input("tau", default=0.5, min=0.01, max=5.0, step=0.01,
                               tooltip="Temperature of the bits while sampling."),
                io.Combo.Input("aspect_ratio", options=list(ASPECTS), default="1:1",
                               tooltip="Width:height of the runs the profile is for."),
                io.Combo.Input("resolution", options=RESOLUTION_CHOICES, default="1M",
                               tooltip="Resolution of the runs the profile is for (0.06M for the embedded model)."),
                filename_input("nextscale_kv_profile_text"),
            ],
            outputs=profile_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, aspect_ratio: str, resolution: str, cfg: float | None = None,
                        tau: float | None = None) -> bool | str:
        return check_run_settings(cls, aspect_ratio, resolution, cfg=cfg, tau=tau)

    @classmethod
    def execute(cls, model: NextScaleModel, tokenizer: NextScaleModel, positive, samples: int, seed: int, cfg: float,
                tau: float, aspect_ratio: str, resolution: str,
                filename: str = "nextscale_kv_profile_text") -> io.NodeOutput:
        check_pair(model, tokenizer)
        family = model.family
        schedule = InfinitySchedule.from_template(ASPECTS[aspect_ratio], resolution)
        check_levels(model, resolution, schedule.num_scales)
        text, mask = text_from_conditioning(positive, 1, model.module.config.text_dim, "positive")
        workload = Workload(batch_size=1, guided=cfg != 1, schedule=schedule, dtype=model.compute_dtype,
                            decode_dtype=tokenizer.compute_dtype, text_tokens=text.shape[1])
        ready_batch(model, tokenizer, batch=1, what="NextScale KV Calibrate (Text)", kv_settings=False,
                    need=lambda images, spec=None: family.memory(model.module, tokenizer.module, workload))
        profile = record_profile(
            family, model.module, tokenizer.module, [TextCondition(text, mask)] * samples, seed=seed,
            options=InfinityOptions(cfg=cfg, tau=tau, schedule=schedule), schedule=schedule, device=model.device,
            callback=progress(cls.hidden.unique_id, samples * schedule.num_scales),
            meta={"resolution": resolution, "aspect_ratio": aspect_ratio, "generator": model.name},
        )
        return io.NodeOutput(profile, save_profile(profile, filename))


class NextScaleKVReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleKVReport",
            display_name="NextScale KV Report",
            category=KV_CATEGORY,
            description="Samples the same class and seed with the full cache and with a KV policy, and reports the "
            "KV memory measured from the cache (peak and carried between scales), the token agreement per scale and "
            "the PSNR of the decoded images. The image output shows full cache | policy side by side.",
            inputs=[
                Generator.Input("generator", tooltip="From NextScale Load Generator."),
                Tokenizer.Input("tokenizer", tooltip="The generator's tokenizer."),
                KVPolicy.Input("kv_policy", tooltip="From NextScale KV Policy."),
                io.String.Input("class_name", default="0",
                                tooltip="Class to sample: a name of the generator's classes or an index."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of both runs."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance of both runs."),
                batch_input(),
            ],
            outputs=report_outputs(),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, cfg: float) -> bool | str:
        return check_numbers(cls, cfg=cfg) or True

    @classmethod
    def execute(cls, generator: NextScaleModel, tokenizer: NextScaleModel, kv_policy: KVPolicySpec, class_name: str,
                seed: int, cfg: float, batch_size: int = 1) -> io.NodeOutput:
        if not isinstance(kv_policy, KVPolicySpec):
            raise NextScaleError("kv_policy must come from NextScale KV Policy")
        check_pair(generator, tokenizer)
        family = generator.family
        label = class_index(class_name, family.class_names(generator.module))
        labels = torch.full((batch_size,), label, dtype=torch.long)
        geometry = family.kv_geometry(generator.module)
        workload = Workload(guided=cfg != 0, dtype=generator.compute_dtype, decode_dtype=tokenizer.compute_dtype)
        size = ready_batch(generator, tokenizer, batch=batch_size,
                           need=report_need(family, generator, tokenizer, workload, geometry, kv_policy),
                           what="NextScale KV Report", kv_settings=False)
        report = KVReport.merge([
            kv_report(generator.module, tokenizer.module, labels[start:stop], seed + start, kv_policy,
                      SamplingOptions(cfg=cfg), generator.device, family=family)
            for start, stop in sub_batches(batch_size, size)
        ])
        return report_output(report, size, batch_size)


def batch_input() -> io.Int.Input:
    """The report nodes' ``batch_size`` input."""
    return io.Int.Input("batch_size", default=1, min=1, max=64,
                        tooltip="Images per run (seeds seed, seed + 1, ...); memory grows with it.")


def report_outputs() -> list:
    """The report nodes' outputs: the text and the images (full cache | policy)."""
    return [io.String.Output("report", display_name="report"), io.Image.Output("images", display_name="images")]


def report_need(family, generator: NextScaleModel, tokenizer: NextScaleModel, workload: Workload, geometry,
                kv_policy: KVPolicySpec):
    """A report's working memory for ``images`` a run: the larger of its two runs, which follow each other (a packed
    cache exceeds the full one near budget 1; the full-cache run needs its whole cache, so no KV setting applies),
    both runs' images decoded at once."""

    def need(images: int, spec=kv_policy):
        policy = spec.bind_scales(geometry.layers, geometry.heads, geometry.scales)
        runs = (
            dataclasses.replace(workload, batch_size=images, kv_policy=run_policy, decode_batch=images)
            for run_policy in (None, policy)
        )
        return max((family.memory(generator.module, tokenizer.module, run) for run in runs), key=lambda n: n.working)

    return need


def report_output(report: KVReport, size: int, batch_size: int) -> io.NodeOutput:
    """The report's text (shown on the node too) and its full cache | policy images."""
    images = torch.cat((report.full_images, report.images), dim=2)
    text = report.text()
    if size < batch_size:
        text += f"\nsampled in sub-batches of {size} images: the KV bytes are one sub-batch's"
    return io.NodeOutput(text, images, ui=ui.PreviewText(text))


class NextScaleKVReportText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleKVReportText",
            display_name="NextScale KV Report (Text)",
            category=KV_CATEGORY,
            description="NextScale KV Report for Infinity models: samples the same prompt and seed with the full "
            "cache and with a KV policy, and reports the KV memory measured from the cache (peak and carried "
            "between scales), the bit agreement per scale and the PSNR of the decoded images. The image output "
            "shows full cache | policy side by side.",
            inputs=[
                InfinityModel.Input("model", tooltip="From NextScale Load Infinity."),
                Tokenizer.Input("tokenizer", tooltip="The BSQ tokenizer from NextScale Load Infinity."),
                KVPolicy.Input("kv_policy", tooltip="From NextScale KV Policy."),
                io.Conditioning.Input("positive", tooltip="The prompt, from NextScale Text Encode (T5)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of both runs."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance of both runs."),
                io.Float.Input("tau", default=0.5, min=0.01, max=5.0, step=0.01,
                               tooltip="Temperature of the bits of both runs."),
                io.Combo.Input("aspect_ratio", options=list(ASPECTS), default="1:1", tooltip="Width:height."),
                io.Combo.Input("resolution", options=RESOLUTION_CHOICES, default="1M",
                               tooltip="Resolution (0.06M for the embedded model)."),
                batch_input(),
            ],
            outputs=report_outputs(),
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, aspect_ratio: str, resolution: str, cfg: float | None = None,
                        tau: float | None = None) -> bool | str:
        return check_run_settings(cls, aspect_ratio, resolution, cfg=cfg, tau=tau)

    @classmethod
    def execute(cls, model: NextScaleModel, tokenizer: NextScaleModel, kv_policy: KVPolicySpec, positive, seed: int,
                cfg: float, tau: float, aspect_ratio: str, resolution: str, batch_size: int = 1) -> io.NodeOutput:
        if not isinstance(kv_policy, KVPolicySpec):
            raise NextScaleError("kv_policy must come from NextScale KV Policy")
        check_pair(model, tokenizer)
        family = model.family
        schedule = InfinitySchedule.from_template(ASPECTS[aspect_ratio], resolution)
        check_levels(model, resolution, schedule.num_scales)
        text, mask = text_from_conditioning(positive, batch_size, model.module.config.text_dim, "positive")
        geometry = family.kv_geometry(model.module, schedule)
        workload = Workload(guided=cfg != 1, schedule=schedule, dtype=model.compute_dtype,
                            decode_dtype=tokenizer.compute_dtype, text_tokens=text.shape[1])
        size = ready_batch(model, tokenizer, batch=batch_size, need=report_need(family, model, tokenizer, workload,
                                                                               geometry, kv_policy),
                           what="NextScale KV Report (Text)", kv_settings=False)
        options = InfinityOptions(cfg=cfg, tau=tau, schedule=schedule)
        report = KVReport.merge([
            kv_report(model.module, tokenizer.module, TextCondition(text[start:stop], mask[start:stop]),
                      seed + start, kv_policy, options, model.device, family=family, schedule=schedule)
            for start, stop in sub_batches(batch_size, size)
        ])
        return report_output(report, size, batch_size)


NODES = [NextScaleKVPolicy, NextScaleKVCalibrate, NextScaleKVReport, NextScaleKVCalibrateText, NextScaleKVReportText]
