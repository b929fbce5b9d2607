"""Speed measurements of terra_nb, reported as ratios measured side by side in one run."""
