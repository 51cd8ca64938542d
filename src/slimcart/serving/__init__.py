"""Serving a saved model on raw inputs: the preprocessing stored with it, and its data record."""
from .bundle import (Bundle, DataRecordWarning, check_model_data, load_bundle, saved_data_record,
                     write_bundle_files)

__all__ = ["Bundle", "DataRecordWarning", "check_model_data", "load_bundle", "saved_data_record",
           "write_bundle_files"]
