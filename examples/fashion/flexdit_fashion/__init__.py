"""flexdit_fashion: the Fashion-MNIST demo's evaluation, kept out of the compiler.

The dataset reader (``datasets``), the shipped classifier and its metrics (``evaluate``:
class accuracy, classifier-feature FD), and the end-to-end quality gate that ``flexdit-export
convert --quality-gate`` plugs in (``quality.FashionMnistGate``). The compiler imports this
package only through its quality-gate plug-in point, lazily; nothing here is needed to
compile or run a bundle.

Data: Fashion-MNIST from ``/usr/share/datasets/fashion-mnist`` (Debian dataset-fashion-mnist),
or ``$FASHION_MNIST_DIR``, or an explicit directory. Classifier: an explicit directory, else
``$FLEXDIT_FASHION_CLASSIFIER``, else the copy shipped as package data (``classifier/``).
"""
