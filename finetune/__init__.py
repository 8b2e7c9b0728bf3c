"""vitscale finetune stage."""
