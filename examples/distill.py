"""Distill a frozen English retriever into a low-resource-language query encoder with OPTICAL.

With no arguments this runs a complete small demo offline (a few minutes on 2 CPU cores): the packaged
all-MiniLM-L6-v2 teacher, a student initialised from the same model, the packaged English-Swahili demo bitext; it
prints the held-out bitext-retrieval accuracy before and after, and writes ./optical-student-sw with its model card.

    python examples/distill.py
    accelerate launch examples/distill.py --teacher sentence-transformers/all-MiniLM-L6-v2 \
        --student intfloat/multilingual-e5-small --bitext train.sw --bitext_target train.en --language sw \
        --bf16 --max_steps 2000 --push_to_hub --hub_model_id my-org/optical-e5-sw
    accelerate launch --multi_gpu --num_processes 2 examples/distill.py ...   # 2 CPU processes (or torchrun)

This is ``optical-hf distill`` (the recipe in optical_hf/recipe.py: ``build_parser`` and ``run``), with its one-line
error messages and exit statuses (OPTICAL_HF_DEBUG=1 shows tracebacks) and its logging (INFO on the main process;
--log_level / --log_level_replica as in the Hugging Face example scripts). Flags: python examples/distill.py
--help (the recipe's: OT options, LoRA, front end, strategies; and the common Trainer arguments); --help-all adds
every other Trainer argument.
"""

import sys

from optical_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
