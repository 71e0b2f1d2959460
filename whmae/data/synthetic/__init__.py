"""The synthetic phantom: a population of hearts with pathologies, rendered as the 9
cine planes of an exam with labels and phenotypes (`phantom`, `phantom_heart`,
`phantom_planes`), and the dataset generator behind `whmae-generate` (`generate`)."""
