"""Offline corpus conversion: manifest -> transcoded media -> WebDataset shards with DALI indexes."""
