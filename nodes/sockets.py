"""Custom socket types. Their ids are permanent: saved workflows refer to them."""

from comfy_api.latest import io

Tokenizer = io.Custom("NEXTSCALE_TOKENIZER")
Generator = io.Custom("NEXTSCALE_GENERATOR")
# An Infinity text-to-image transformer (models.infinity.Infinity in a model_files.LoadedModel).
InfinityModel = io.Custom("NEXTSCALE_INFINITY")
Tokens = io.Custom("NEXTSCALE_TOKENS")
SamplerOptions = io.Custom("NEXTSCALE_SAMPLER_OPTIONS")
# An edit guide (models.editing.EditSpec): anything with bind(tokenizer, patch_nums, batch_size, device) -> Guide.
Guide = io.Custom("NEXTSCALE_GUIDE")
# A control (CAR, adapters): anything with bind(generator, tokenizer, batch_size, device) -> models.sampler.Control.
Control = io.Custom("NEXTSCALE_CONTROL")
# A KV-cache policy: anything with bind(generator, batch_size, device) -> models.kv_cache.KVPolicy.
KVPolicy = io.Custom("NEXTSCALE_KV_POLICY")
# A KV calibration profile (models.kv_profile.KVProfile) from NextScale KV Calibrate to NextScale KV Policy.
KVProfile = io.Custom("NEXTSCALE_KV_PROFILE")
# A loaded control model (CAR branch or NextScale adapter) from NextScale Load Control.
ControlModel = io.Custom("NEXTSCALE_CONTROL_MODEL")

CATEGORY = "NextScale"
