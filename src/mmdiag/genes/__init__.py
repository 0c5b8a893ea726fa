"""Gene-expression tables: readers (text, ``.h5ad``), GMT gene sets, fitted preprocessing."""

from mmdiag.genes.gene_sets import GeneSetError, read_gmt, select_gene_set, write_gmt
from mmdiag.genes.preprocess import ExpressionPreprocessor
from mmdiag.genes.tables import GeneTableError, read_expression, read_obs, validate_expression

__all__ = [
    "ExpressionPreprocessor",
    "GeneSetError",
    "GeneTableError",
    "read_expression",
    "read_gmt",
    "read_obs",
    "select_gene_set",
    "validate_expression",
    "write_gmt",
]
