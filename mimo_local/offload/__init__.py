"""Memory planning and CPU/GPU expert placement: `mimo plan`, `mimo profile-experts` and the
--gpu-mem/--cpu-mem/--cpu-moe/--n-cpu-moe/--override-tensor flags.

inventory.py  every placeable unit and its bytes (meta-device build from config.json, headers if any)
schemes.py    which scheme each weight gets (--quant recipe, or what a quantized checkpoint holds) and its bytes
plan.py       the placement policy and the per-device, per-component plan
placement.py  applying a plan to a model being loaded
hotness.py    router statistics beside the model
options.py    the shared CLI flags
report.py     the plan as a table
"""
