-- CTR distribution by group and model, one film per patient (label_results.patient_film = 1:
-- each patient's earliest film in the group; NIH's cardiomegaly group is 2,776 films of 1,566
-- patients): patients and films, then the mean, min, max and share above 0.5 of the patients'
-- films. Films the input check flagged (not a frontal chest film the model can read) are left out.
SELECT group_name, model,
       SUM(CASE WHEN patient_film = 1 THEN 1 ELSE 0 END) AS patients, COUNT(*) AS films,
       'one film per patient (earliest)' AS counted,
       ROUND(CAST(AVG(CASE WHEN patient_film = 1 THEN ctr END) AS NUMERIC), 3) AS mean_ctr,
       ROUND(CAST(MIN(CASE WHEN patient_film = 1 THEN ctr END) AS NUMERIC), 3) AS min_ctr,
       ROUND(CAST(MAX(CASE WHEN patient_film = 1 THEN ctr END) AS NUMERIC), 3) AS max_ctr,
       ROUND(CAST(AVG(CASE WHEN patient_film = 1 THEN (CASE WHEN ctr > 0.5 THEN 1.0 ELSE 0.0 END) END)
                  AS NUMERIC), 3) AS share_ctr_over_0_5
FROM label_results
WHERE ctr IS NOT NULL AND in_statistics = 1
GROUP BY group_name, model
ORDER BY group_name, model;
