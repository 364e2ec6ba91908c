# Copyright the trl-lifealign developers. Licensed under the Apache License, Version 2.0.
"""FPO training script (TRL's DPO script with FPOTrainer), kept here as the documented entry point of this folder.

It is the installed command `lifealign fpo` (module `trl_lifealign.fpo.script`); these are equivalent:

    accelerate launch recipes/trl/fpo.py --model_name_or_path ... --dataset_name ... --focal_gamma 2.0
    accelerate launch -m trl_lifealign fpo --model_name_or_path ... --dataset_name ... --focal_gamma 2.0
    lifealign fpo --model_name_or_path ... --dataset_name ... --focal_gamma 2.0
"""

from trl_lifealign.fpo.script import load_preference_dataset, main, make_parser, run  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(run(prog="recipes/trl/fpo.py"))
