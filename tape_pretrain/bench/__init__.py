"""`tape-pretrain bench ...`: side-by-side measurements printed as ratios, last line key=value."""
