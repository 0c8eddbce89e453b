"""Expert predictors: which experts a layer will need, guessed before its router runs."""
