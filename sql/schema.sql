-- cxrlabel schema, version 10. Generated from pipeline/db/schema.py by
-- `cxrlabel db schema > sql/schema.sql`; tests check the two agree.

CREATE TABLE ctr_calibrations (
	model_sha256 VARCHAR(64) NOT NULL, 
	site VARCHAR(100) NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	kind VARCHAR(10) NOT NULL, 
	intercept FLOAT NOT NULL, 
	slope FLOAT NOT NULL, 
	intercept_low FLOAT, 
	intercept_high FLOAT, 
	slope_low FLOAT, 
	slope_high FLOAT, 
	films INTEGER NOT NULL, 
	details TEXT, 
	fitted_at DATETIME NOT NULL, 
	PRIMARY KEY (model_sha256, site)
);

CREATE TABLE failures (
	id INTEGER NOT NULL, 
	stage VARCHAR(20) NOT NULL, 
	uid VARCHAR(200), 
	error_class VARCHAR(60) NOT NULL, 
	message TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	last_seen_at DATETIME, 
	PRIMARY KEY (id)
);

CREATE UNIQUE INDEX ix_failures_stage_uid ON failures (stage, uid);

CREATE TABLE images (
	uid VARCHAR(200) NOT NULL, 
	source VARCHAR(40) NOT NULL, 
	patient_id VARCHAR(100), 
	age INTEGER, 
	sex VARCHAR(1), 
	"view" VARCHAR(20), 
	study_date VARCHAR(10), 
	text TEXT, 
	labels TEXT, 
	reference TEXT, 
	report_ctr FLOAT, 
	path TEXT, 
	width INTEGER, 
	height INTEGER, 
	spacing_x FLOAT, 
	spacing_y FLOAT, 
	spacing_source VARCHAR(80), 
	modality VARCHAR(10), 
	body_part VARCHAR(40), 
	photometric VARCHAR(20), 
	study_uid VARCHAR(100), 
	sop_uid VARCHAR(100), 
	study_description TEXT, 
	accession VARCHAR(64), 
	license VARCHAR(40), 
	loaded_at DATETIME NOT NULL, 
	PRIMARY KEY (uid)
);

CREATE TABLE label_runs (
	id INTEGER NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	model_sha256 VARCHAR(64), 
	selection TEXT NOT NULL, 
	device VARCHAR(20), 
	host VARCHAR(100), 
	pid INTEGER, 
	started_at DATETIME NOT NULL, 
	ended_at DATETIME, 
	n_selected INTEGER, 
	n_labelled INTEGER, 
	n_skipped INTEGER, 
	n_failed INTEGER, 
	status VARCHAR(20) NOT NULL, 
	heart_definition VARCHAR(20), 
	PRIMARY KEY (id)
);

CREATE TABLE load_errors (
	id INTEGER NOT NULL, 
	source_file TEXT NOT NULL, 
	line INTEGER, 
	uid VARCHAR(200), 
	reason TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	last_seen_at DATETIME, 
	PRIMARY KEY (id)
);

CREATE UNIQUE INDEX uq_load_errors_item ON load_errors (source_file, line, uid);

CREATE TABLE mask_sources (
	source VARCHAR(100) NOT NULL, 
	definitions TEXT NOT NULL, 
	imported_at DATETIME NOT NULL, 
	PRIMARY KEY (source)
);

CREATE TABLE models (
	name VARCHAR(100) NOT NULL, 
	preset VARCHAR(60) NOT NULL, 
	config TEXT NOT NULL, 
	data_hash VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	dice_heart FLOAT, 
	dice_left_lung FLOAT, 
	dice_right_lung FLOAT, 
	metrics TEXT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE pacs_exports (
	destination VARCHAR(300) NOT NULL, 
	sop_uid VARCHAR(100) NOT NULL, 
	kind VARCHAR(10) NOT NULL, 
	uid VARCHAR(200) NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	sop_class_uid VARCHAR(100) NOT NULL, 
	study_uid VARCHAR(100) NOT NULL, 
	series_uid VARCHAR(100) NOT NULL, 
	supersedes VARCHAR(100), 
	exported_at DATETIME NOT NULL, 
	PRIMARY KEY (destination, sop_uid)
);

CREATE INDEX ix_pacs_exports_uid ON pacs_exports (uid, model, kind);

CREATE TABLE quality_scores (
	model_sha256 VARCHAR(64) NOT NULL, 
	tta BOOLEAN NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	score TEXT NOT NULL, 
	origin TEXT, 
	fitted_at DATETIME NOT NULL, 
	PRIMARY KEY (model_sha256, tta)
);

CREATE TABLE schema_version (
	version INTEGER NOT NULL, 
	applied_at DATETIME NOT NULL, 
	views_sha256 VARCHAR(64), 
	PRIMARY KEY (version)
);

CREATE TABLE cache (
	uid VARCHAR(200) NOT NULL, 
	settings_id VARCHAR(16) NOT NULL, 
	path TEXT NOT NULL, 
	orig_height INTEGER NOT NULL, 
	orig_width INTEGER NOT NULL, 
	size INTEGER NOT NULL, 
	mode VARCHAR(10) NOT NULL, 
	offset_x FLOAT NOT NULL, 
	offset_y FLOAT NOT NULL, 
	scale_x FLOAT NOT NULL, 
	scale_y FLOAT NOT NULL, 
	checksum VARCHAR(64) NOT NULL, 
	bytes INTEGER, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (uid, settings_id), 
	FOREIGN KEY(uid) REFERENCES images (uid) ON DELETE CASCADE
);

CREATE TABLE groups (
	uid VARCHAR(200) NOT NULL, 
	group_name VARCHAR(40) NOT NULL, 
	rule TEXT, 
	assigned_at DATETIME NOT NULL, 
	PRIMARY KEY (uid), 
	FOREIGN KEY(uid) REFERENCES images (uid) ON DELETE CASCADE
);

CREATE INDEX ix_groups_group_name ON groups (group_name);

CREATE TABLE masks (
	id INTEGER NOT NULL, 
	uid VARCHAR(200) NOT NULL, 
	structure VARCHAR(20) NOT NULL, 
	kind VARCHAR(10) NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	run_id INTEGER, 
	encoding VARCHAR(10) NOT NULL, 
	height INTEGER NOT NULL, 
	width INTEGER NOT NULL, 
	area INTEGER NOT NULL, 
	data BLOB NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_masks_identity UNIQUE (uid, structure, kind, model), 
	FOREIGN KEY(uid) REFERENCES images (uid) ON DELETE CASCADE, 
	FOREIGN KEY(run_id) REFERENCES label_runs (id)
);

CREATE TABLE measurements (
	uid VARCHAR(200) NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	run_id INTEGER, 
	heart_area_px INTEGER, 
	heart_area_mm2 FLOAT, 
	heart_width_px INTEGER, 
	thoracic_width_px INTEGER, 
	heart_width_mm FLOAT, 
	thoracic_width_mm FLOAT, 
	ctr FLOAT, 
	ctr_missing VARCHAR(40), 
	heart_x0 INTEGER, 
	heart_y0 INTEGER, 
	heart_x1 INTEGER, 
	heart_y1 INTEGER, 
	lungs_x0 INTEGER, 
	lungs_y0 INTEGER, 
	lungs_x1 INTEGER, 
	lungs_y1 INTEGER, 
	quality FLOAT, 
	quality_heart FLOAT, 
	quality_left_lung FLOAT, 
	quality_right_lung FLOAT, 
	trust FLOAT, 
	labelled_at DATETIME NOT NULL, 
	input_check VARCHAR(120), 
	mm_calibration VARCHAR(160), 
	reviewed_ctr FLOAT, 
	reviewed_heart_width_px INTEGER, 
	reviewed_thoracic_width_px INTEGER, 
	PRIMARY KEY (uid, model), 
	FOREIGN KEY(uid) REFERENCES images (uid) ON DELETE CASCADE, 
	FOREIGN KEY(run_id) REFERENCES label_runs (id)
);

CREATE INDEX ix_measurements_model_quality ON measurements (model, quality);

CREATE INDEX ix_measurements_model_trust ON measurements (model, trust);

CREATE TABLE reviews (
	id INTEGER NOT NULL, 
	uid VARCHAR(200) NOT NULL, 
	model VARCHAR(100) NOT NULL, 
	version INTEGER NOT NULL, 
	structure VARCHAR(20) NOT NULL, 
	decision VARCHAR(10) NOT NULL, 
	reviewer VARCHAR(100) NOT NULL, 
	at DATETIME NOT NULL, 
	note TEXT, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_reviews_version UNIQUE (uid, model, version, structure), 
	FOREIGN KEY(uid) REFERENCES images (uid) ON DELETE CASCADE
);

CREATE TABLE samples (
	name VARCHAR(100) NOT NULL, 
	uid VARCHAR(200) NOT NULL, 
	group_name VARCHAR(40), 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (name, uid), 
	FOREIGN KEY(uid) REFERENCES images (uid) ON DELETE CASCADE
);
