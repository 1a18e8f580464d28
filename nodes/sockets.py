"""Custom socket types. Their ids are permanent: saved workflows refer to them.

The model sockets (tokenizer, generator, Infinity model, control model) carry a :class:`.service.NextScaleModel`;
its family says what it is and how to use it.
"""

from comfy_api.latest import io

Tokenizer = io.Custom("NEXTSCALE_TOKENIZER")
Generator = io.Custom("NEXTSCALE_GENERATOR")
# An Infinity text-to-image transformer, from NextScale Load Infinity.
InfinityModel = io.Custom("NEXTSCALE_INFINITY")
# A Switti text-to-image transformer, from NextScale Load Switti.
SwittiModel = io.Custom("NEXTSCALE_SWITTI")
# An NSARM super-resolution model, from NextScale Load NSARM.
NSARMModel = io.Custom("NEXTSCALE_NSARM")
# A Distilled Decoding transformer (VAR distilled to one or two steps), from NextScale Load Distilled Decoding.
DDModel = io.Custom("NEXTSCALE_DD")
# An HMAR transformer (VAR with next-scale and mask branches), from NextScale Load HMAR.
HMARModel = io.Custom("NEXTSCALE_HMAR")
# A FlexVAR transformer (any resolution and number of steps), from NextScale Load FlexVAR.
FlexVARModel = io.Custom("NEXTSCALE_FLEXVAR")
Tokens = io.Custom("NEXTSCALE_TOKENS")
SamplerOptions = io.Custom("NEXTSCALE_SAMPLER_OPTIONS")
# An edit guide (models.var.editing.EditSpec): anything with bind(tokenizer, patch_nums, batch_size, device) -> Guide.
Guide = io.Custom("NEXTSCALE_GUIDE")
# A control (control.ControlSpec): models() -> the control models to make ready with the generator, and
# bind(generator, tokenizer, batch_size, device) -> models.core.hooks.Control.
Control = io.Custom("NEXTSCALE_CONTROL")
# A KV-cache policy (models.kv.policies.KVPolicySpec): bind_scales(layers, heads, scales) -> KVPolicy, for the
# cache shape of the generator's family (models.core.family.KVGeometry).
KVPolicy = io.Custom("NEXTSCALE_KV_POLICY")
# A KV calibration profile (models.kv.profile.KVProfile) from NextScale KV Calibrate to NextScale KV Policy.
KVProfile = io.Custom("NEXTSCALE_KV_PROFILE")
# A training-free acceleration (models.core.accel.Acceleration) from NextScale Acceleration.
Accel = io.Custom("NEXTSCALE_ACCEL")
# A loaded control model (CAR branch or NextScale adapter) from NextScale Load Control.
ControlModel = io.Custom("NEXTSCALE_CONTROL_MODEL")

CATEGORY = "NextScale"
