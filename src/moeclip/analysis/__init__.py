"""Looking inside: routing maps and expert analysis (explain), figures (viz, overlay), HTML
evaluation reports (report) and ablations (ablate)."""
