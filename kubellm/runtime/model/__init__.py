"""Model code: loader, layers, attention, decoder, sampler, runner."""
