"""Ingestion of real exams into the dataset format: UK-Biobank-layout NIfTI
(`nifti_exam`, `nifti_io`) and DICOM (`dicom_exam`), label conventions (`label_maps`),
subject discovery and split files (`subjects`, `split_file`), the manifest
(`manifest`), `whmae-prepare` (`prepare`) and `whmae-qc` (`qc`)."""
