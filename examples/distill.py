"""Distill a frozen English retriever into a low-resource-language query encoder with OPTICAL.

With no arguments this runs a complete small demo offline (a few minutes on 2 CPU cores): the packaged
all-MiniLM-L6-v2 teacher, a student initialised from the same model, the packaged English-Swahili demo bitext; it
prints the held-out bitext-retrieval accuracy before and after, and writes ./optical-student-sw with its model card.

    python examples/distill.py
    accelerate launch examples/distill.py --teacher sentence-transformers/all-MiniLM-L6-v2 \
        --student intfloat/multilingual-e5-small --bitext train.sw --bitext_target train.en --language sw \
        --bf16 --max_steps 2000 --push_to_hub --hub_model_id my-org/optical-e5-sw

Every flag: python examples/distill.py --help (OT options, LoRA, front end, and all Trainer arguments).
"""

from optical_hf.recipe import build_parser, run, use_cpu_processes_if_no_gpu

if __name__ == "__main__":
    use_cpu_processes_if_no_gpu()
    distill_args, training_args = build_parser().parse_args_into_dataclasses()
    run(distill_args, training_args)
