"""Control injection: CAR's official control branches, NextScale's trainable adapters, control maps."""
