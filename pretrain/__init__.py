"""vitscale pretrain stage."""
