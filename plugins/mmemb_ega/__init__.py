"""Loss reweighters: the Explicit Gradient Amplifier (EGA) and the ones it is compared with."""
