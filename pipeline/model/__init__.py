"""The model: backbones (nets/), decoding, tf.data inference, weights and precision, batch featurizing."""
