"""`vlrlcd plan CONFIG`'s memory estimator, one purpose a module: `published` (the recipes' students'
architectures), `arch` (config.json and parameter counts), `model` (a step's shapes, settings and plan),
`methods` (what the method registry says a step rolls out and runs), `step` (the analytic line items of one
RL step), `report` (the largest K / batch that fit, the table and JSON). `vlrlcd.plan` re-exports the API."""
